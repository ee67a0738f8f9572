"""The hub's own disk fails: an ACKed write is never lost, and the hub says so.

The hub's data directory is put on a real small file system (tmpfs with
``size=``) and filled with a ballast file, so that journal appends, replica
writes and metadata writes fail with ENOSPC as they would on a full disk.
Each test asserts what PROTOCOL.md RP-10 promises: a record that could not
be journaled is answered with ERROR(IO_ERROR) and so is every later record
of the stream; nothing refused is ever ACKed; the segment holds whole
records only; ``status`` says ``degraded`` while it lasts; and once space
comes back the hub takes records again by itself and the agent's marked
regions are resynced.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
import zlib

import pytest

import protocol as p
import rephub
from hubtools import AgentError, MemVolume, TestAgent, make_agents_file, wait_detached, wait_until
from smallfs import ballast, tmpfs

MiB = 1024 * 1024


def segment_records(path: str) -> list[tuple[int, bytes]]:
    """(seq, payload) of every whole record of a segment file; raise on a torn byte."""
    data = open(path, "rb").read()
    out, pos = [], 0
    while pos < len(data):
        fields = rephub.RECORD.unpack_from(data, pos)
        magic, seq, plen, payload_crc = fields[0], fields[4], fields[7], fields[10]
        assert magic == rephub.RECORD_MAGIC, f"no record at byte {pos} of {path}"
        start = pos + rephub.RECORD.size
        payload = data[start:start + plen]
        assert len(payload) == plen and zlib.crc32(payload) == payload_crc, \
            f"torn record seq {seq} at byte {pos} of {path}"
        out.append((seq, payload))
        pos = start + plen
    return out


# -- SegmentLog: an append is all or nothing -----------------------------------------------


def test_append_after_enospc_reads_back_what_was_appended(tmp_path):
    """ENOSPC in the middle of a record cuts it off; the next record, after
    space is freed, reads back exactly its own bytes, before and after a rescan."""
    rng = random.Random(14)
    with tmpfs(tmp_path / "fs", 4 * MiB) as fs:
        space = ballast(fs, 900 * 1024)
        seglog = rephub.SegmentLog(os.path.join(fs, "journal"), "journal")
        kept: dict[int, bytes] = {}
        failed_at = None
        for seq in range(1, 40):
            payload = rng.randbytes(256 * 1024)
            try:
                rec = seglog.append(seq, rephub.RecordKind.WRITE, 0, seq, 1, 0, len(payload),
                                    [payload])
            except OSError as err:
                assert err.errno == errno.ENOSPC
                failed_at = seq
                break
            kept[seq] = payload
            assert seglog.read_payload(rec) == payload
        assert failed_at is not None and kept, "the file system never filled"
        path = seglog.path(seglog.segment)
        assert seglog.broken is None, "the cut-back after the failed append did not succeed"
        assert os.path.getsize(path) == seglog.size == seglog.total_bytes()
        assert [s for s, _ in segment_records(path)] == sorted(kept)

        os.unlink(space)
        payload = rng.randbytes(256 * 1024)
        rec = seglog.append(failed_at, rephub.RecordKind.WRITE, 0, failed_at, 1, 0,
                            len(payload), [payload])
        kept[failed_at] = payload
        assert seglog.read_payload(rec) == payload
        seglog.do_sync(seglog.take_sync_work())
        seglog.close()

        again = rephub.SegmentLog(os.path.join(fs, "journal"), "journal")
        records = again.open()
        assert {r.seq: again.read_payload(r) for r in records} == kept
        again.close()


def test_a_failed_cut_back_closes_the_log_until_it_succeeds(tmp_path, monkeypatch):
    """If the torn record cannot be cut off either, nothing is appended after it."""
    seglog = rephub.SegmentLog(str(tmp_path / "j"), "journal")
    seglog.append(1, rephub.RecordKind.WRITE, 0, 1, 1, 0, 5, [b"first"])
    real_pwritev, real_ftruncate = os.pwritev, os.ftruncate

    def torn_pwritev(fd, buffers, offset):
        os.pwrite(fd, bytes(buffers[0])[:7], offset)   # part of a header reaches the file
        raise OSError(errno.EIO, "injected write error")

    def failing_ftruncate(fd, length):
        raise OSError(errno.EIO, "injected truncate error")

    monkeypatch.setattr(os, "pwritev", torn_pwritev)
    monkeypatch.setattr(os, "ftruncate", failing_ftruncate)
    with pytest.raises(OSError):
        seglog.append(2, rephub.RecordKind.WRITE, 0, 2, 1, 0, 6, [b"second"])
    assert seglog.broken is not None
    monkeypatch.setattr(os, "pwritev", real_pwritev)
    with pytest.raises(OSError, match="injected truncate"):
        seglog.append(2, rephub.RecordKind.WRITE, 0, 2, 1, 0, 6, [b"second"])
    monkeypatch.setattr(os, "ftruncate", real_ftruncate)
    rec = seglog.append(2, rephub.RecordKind.WRITE, 0, 2, 1, 0, 6, [b"second"])
    assert seglog.read_payload(rec) == b"second"
    assert [s for s, _ in segment_records(seglog.path(seglog.segment))] == [1, 2]
    seglog.close()


# -- the hub: refuse, degrade, recover -------------------------------------------------------


@pytest.fixture
def full_hub(tmp_path):
    """An in-process hub whose data directory is a 48 MiB tmpfs."""
    agents = str(tmp_path / "agents")
    secrets_by_id = make_agents_file(agents, "a1", "a2")
    with tmpfs(tmp_path / "fs", 48 * MiB) as fs:
        hub = rephub.Hub(os.path.join(fs, "data"), agents, heartbeat=0.2)
        hub.start()
        try:
            yield hub, secrets_by_id, fs
        finally:
            hub.shutdown(grace=5)


def write_until_refused(agent: TestAgent, vid: int, vol: MemVolume, rng, limit: int = 400):
    """Random 256 KiB writes, each waited for, until the hub refuses one; then a
    few more.  Returns (acked, refused) lists of (offset, length).  A refused
    write stays marked, as a real agent keeps it (RP-8)."""
    acked, refused = [], []
    for _ in range(limit):
        offset = rng.randrange(0, vol.size // 65536) * 65536
        data = rng.randbytes(256 * 1024)[:vol.size - offset]
        reply = agent.wait_reply(agent.write(vid, offset, data))
        if isinstance(reply, p.Error):
            assert reply.code == p.ErrorCode.IO_ERROR, reply.describe()
            vol.dirty.append((offset, len(data)))
            refused.append((offset, len(data)))
            if len(refused) >= 5:
                break
        else:
            assert not refused, "a write after a refused one was ACKed (stream order)"
            acked.append((offset, len(data)))
    return acked, refused


def test_a_full_journal_refuses_degrades_and_recovers(full_hub, caplog):
    hub, secrets_by_id, fs = full_hub
    rng = random.Random(1414)
    vol = MemVolume(8 * MiB, rng.randbytes(8 * MiB))
    coded = TestAgent(hub.address, "a1", secrets_by_id["a1"])
    coded.features = p.Feature.GOODBYE_CODE
    with coded.connect() as agent:
        vid, plan = agent.attach("v", vol)
        assert plan == p.SyncPlan.FULL
        wait_until(lambda: hub.store.volume("v").state == rephub.VolState.CONSISTENT, 30,
                   "the initial sync")
        space = ballast(fs, 12 * MiB)
        acked, refused = write_until_refused(agent, vid, vol, rng)
        assert acked and refused, f"acked {len(acked)}, refused {len(refused)}"

        st = hub.status()
        faults = {d["fault"] for d in st["degraded"]}
        assert "journal full" in faults, st["degraded"]
        v = next(v for v in st["volumes"] if v["name"] == "v")
        assert "journal full" in {d["fault"] for d in v["degraded"]}
        assert "degraded: " in rephub.format_status(st)
        assert 'rephub_degraded{fault="journal full",volume=""} 1' in rephub.hub_metrics(st)
        # Later records of the stream are refused without touching the disk.
        assert isinstance(agent.wait_reply(agent.checkpoint("after-refusal")), p.Error)

        # A hub whose journal cannot take records still answers the rest.
        with TestAgent(hub.address, "a2", secrets_by_id["a2"]).connect() as other:
            with pytest.raises(AgentError, match="IO_ERROR"):
                other.attach("w", MemVolume(MiB))
        assert hub.store.window.points(hub.store.volume("v"))["volume"] == "v"

        # Every segment holds whole records only.
        for seg in hub.store.journal.log.segments():
            segment_records(hub.store.journal.log.path(seg))

        os.unlink(space)
        wait_until(lambda: agent.goodbye == rephub.STORAGE_RECOVERED, 30,
                   "the hub to end the refused stream once space is back")
        # The code is what an agent decides on, never the text (LV-5).
        assert agent.granted & p.Feature.GOODBYE_CODE
        assert agent.goodbye_code == p.GoodbyeCode.STORAGE_RECOVERED, agent.goodbye_code
        wait_until(lambda: not hub.status()["degraded"], 30, "degraded to clear")

    wait_detached(hub, "v")
    vol.dirty = [(s, e - s) for s, e in rephub.merge_ranges((o, o + n) for o, n in vol.dirty)]
    with TestAgent(hub.address, "a1", secrets_by_id["a1"]).connect() as agent:
        vid, plan = agent.attach("v", vol, state=p.VolumeState.DIRTY)
        assert plan == p.SyncPlan.DIRTY
        wait_until(lambda: hub.store.volume("v").state == rephub.VolState.CONSISTENT
                   and hub.store.volume("v").sync is None, 30, "the resync of refused writes")
        hub.store.applier.wait_applied(hub.store.journal.durable_seq)
        with open(os.path.join(hub.store.dir, "volumes", "v", "replica"), "rb") as f:
            assert f.read() == bytes(vol.buf), "replica differs from the agent's disk"
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the hub log"


def test_spare_segments_give_their_space_back_when_the_disk_fills(tmp_path):
    """Retention keeps dropped segments as spares to write over.  When the disk
    is full the storage watcher deletes them before it decides whether the
    journal can take records again, and no segment is kept while less than an
    eighth of the disk is free."""
    agents = str(tmp_path / "agents")
    secrets_by_id = make_agents_file(agents, "a1")
    rng = random.Random(5)
    segment = 512 * 1024
    with tmpfs(tmp_path / "fs", 24 * MiB) as fs:
        hub = rephub.Hub(os.path.join(fs, "data"), agents, heartbeat=0.2,
                         max_bytes=4 * segment, segment_bytes=segment)
        hub.start()
        store, journal_dir = hub.store, os.path.join(fs, "data", "journal")
        try:
            vol = MemVolume(2 * MiB)
            with TestAgent(hub.address, "a1", secrets_by_id["a1"]).connect() as agent:
                vid, _ = agent.attach("v", vol)
                wait_until(lambda: store.volume("v").state == rephub.VolState.CONSISTENT,
                           30, "the initial sync")

                def write_some(n=40):              # 2.5 MiB: over --journal-max-bytes
                    for _ in range(n):
                        offset = rng.randrange(0, 32) * 65536
                        reply = agent.wait_reply(agent.write(vid, offset, rng.randbytes(65536)))
                        assert isinstance(reply, p.Ack), reply

                st = os.statvfs(fs)          # what a full journal needs free to go on
                needed = min(rephub.RESUME_FREE_BYTES, st.f_blocks * st.f_frsize // 16)
                deadline = time.monotonic() + 30
                while store.journal.log.spare_total() < needed:
                    assert time.monotonic() < deadline, "retention kept too few spares"
                    first = store.journal.first_seq
                    write_some()
                    wait_until(lambda: store.journal.first_seq > first, 10,
                               "retention (about once a second) to drop segments")
                assert sum(os.path.getsize(store.journal.log.spare_path(b))
                           for b in store.journal.log.spares) >= needed

                space = ballast(fs, 64 * 1024)
                # What the storage watcher runs while the journal refuses records.
                assert store.faults.try_reopen(), "the spares' space was not enough"
                assert store.journal.log.spares == {}
                assert not [n for n in os.listdir(journal_dir) if n.endswith(".spare")]
                assert store.faults.writable()
                # With less than an eighth of the disk free no spare is kept either:
                # the segments retention drops now are deleted.  (Retention runs
                # on the applier's thread: the test waits for it, it does not drop
                # a segment itself, which would race it.)
                first = store.journal.first_seq
                deadline = time.monotonic() + 30
                while store.journal.first_seq == first:
                    assert time.monotonic() < deadline, "retention dropped no segment"
                    write_some(4)
                    store.applier.wait_applied(store.journal.durable_seq)
                    try:                            # retention runs about once a second
                        wait_until(lambda: store.journal.first_seq > first, 1.5, "retention")
                    except TimeoutError:
                        pass                        # not yet over the bound: write more
                assert store.journal.log.spares == {}
                assert not [n for n in os.listdir(journal_dir) if n.endswith(".spare")]
                os.unlink(space)
        finally:
            hub.shutdown(grace=5)


def test_metadata_enospc_at_attach_is_an_error_not_a_closed_connection(full_hub, caplog):
    hub, secrets_by_id, fs = full_hub
    ballast(fs, 0)
    with TestAgent(hub.address, "a1", secrets_by_id["a1"]).connect() as agent:
        with pytest.raises(AgentError, match="IO_ERROR") as info:
            agent.attach("new", MemVolume(MiB))
        assert "cannot create volume new" in info.value.error.message
        assert not agent.closed.is_set(), "the hub closed the connection"
        agent.flush()   # the connection goes on
    assert "metadata I/O error" in {d["fault"] for d in hub.status()["degraded"]}
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the hub log"


def test_a_failing_replica_write_degrades_and_resumes(tmp_path, monkeypatch):
    """EIO from the replica: ACKs go on (the journal has the data), status says
    ``replica I/O error``, and the applier resumes where it stopped."""
    agents = str(tmp_path / "agents")
    secrets_by_id = make_agents_file(agents, "a1")
    hub = rephub.Hub(str(tmp_path / "data"), agents, heartbeat=0.2)
    hub.start()
    try:
        vol = MemVolume(2 * MiB)
        with TestAgent(hub.address, "a1", secrets_by_id["a1"]).connect() as agent:
            vid, _ = agent.attach("v", vol)
            wait_until(lambda: hub.store.volume("v").state == rephub.VolState.CONSISTENT, 20,
                       "the initial sync")
            failing = [True]
            real_copy = rephub.SegmentLog.copy_payload

            def copy_payload(self, rec, fd, offset):
                if failing[0]:
                    raise OSError(errno.EIO, "injected replica write error")
                return real_copy(self, rec, fd, offset)

            monkeypatch.setattr(rephub.SegmentLog, "copy_payload", copy_payload)
            for i in range(8):
                agent.expect_ack(agent.write(vid, i * 65536, bytes([i + 1]) * 65536))
            wait_until(lambda: "replica I/O error" in {
                d["fault"] for d in hub.status()["degraded"]}, 20, "replica fault reported")
            assert hub.store.applier.applied_seq < hub.store.journal.durable_seq
            failing[0] = False
            wait_until(lambda: not hub.status()["degraded"]
                       and hub.store.applier.applied_seq == hub.store.journal.durable_seq, 30,
                       "the applier to resume")
            with open(os.path.join(hub.store.dir, "volumes", "v", "replica"), "rb") as f:
                assert f.read() == bytes(vol.buf)
    finally:
        hub.shutdown(grace=5)


def test_degraded_is_logged_once_per_transition(caplog):
    health = rephub.Health()
    with caplog.at_level(logging.INFO, logger="rephub"):
        for _ in range(50):
            health.fail(rephub.Fault.JOURNAL_FULL, "no space")
        health.clear(rephub.Fault.JOURNAL_FULL)
        health.clear(rephub.Fault.JOURNAL_FULL)
    texts = [r.getMessage() for r in caplog.records]
    assert sum("degraded: journal full" in t for t in texts) == 1
    assert sum("recovered: journal full" in t for t in texts) == 1


# -- corruption at rest ----------------------------------------------------------------


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-yet-applied"])
def test_bit_rot_in_the_middle_of_the_journal(tmp_path, applied, caplog):
    """16 bytes flipped inside a record in the middle of a segment: the hub
    starts, keeps every later record, copies the segment aside, and verifies
    the volume against its agent; if the replica never got the record, the
    points after it are refused until that verify ends."""
    agents = str(tmp_path / "agents")
    secrets_by_id = make_agents_file(agents, "a1")
    data_dir = str(tmp_path / "data")
    rng = random.Random(16)
    vol = MemVolume(2 * MiB, rng.randbytes(2 * MiB))
    hub = rephub.Hub(data_dir, agents, heartbeat=0.2)
    hub.start()
    try:
        with TestAgent(hub.address, "a1", secrets_by_id["a1"]).connect() as agent:
            vid, _ = agent.attach("v", vol)
            wait_until(lambda: hub.store.volume("v").state == rephub.VolState.CONSISTENT, 20,
                       "the initial sync")
            for i in range(30):
                agent.expect_ack(agent.write(vid, rng.randrange(32) * 65536,
                                             rng.randbytes(65536)))
        last_seq = hub.store.journal.last_seq
        writes = [r for r in hub.store.journal.records if r.kind == rephub.RecordKind.WRITE
                  and not r.flags & rephub.RECORD_FROM_SYNC]
        victim = writes[len(writes) // 2]
    finally:
        hub.shutdown(grace=5)
    seg = os.path.join(data_dir, "journal", f"{victim.segment:020d}.seg")
    with open(seg, "r+b") as f:
        f.seek(victim.pos + victim.payload_length // 2)
        rotten = bytes(b ^ 0xFF for b in f.read(16))
        f.seek(victim.pos + victim.payload_length // 2)
        f.write(rotten)
    if not applied:   # as if the hub had crashed before applying it
        with open(os.path.join(data_dir, "applied.json"), "w") as f:
            f.write('{"applied_seq": %d}' % (victim.seq - 1))
        with open(os.path.join(data_dir, "volumes", "v", "replica"), "r+b") as f:
            f.seek(victim.offset)
            f.write(bytes(victim.length))

    hub = rephub.Hub(data_dir, agents, heartbeat=0.2)
    hub.start()
    try:
        store = hub.store
        assert [seq for seq, _, _ in store.journal.lost] == [victim.seq]
        assert store.journal.last_seq == last_seq, "records after the damage were cut"
        copy = store.journal.log.damage[0]["copy"]
        assert os.stat(copy).st_mode & 0o777 == 0o600    # it holds protected data
        assert os.stat(os.path.dirname(copy)).st_mode & 0o777 == 0o700
        v = store.volume("v")
        assert v.meta["pending_plan"] == "VERIFY" and v.state == rephub.VolState.SYNCING
        latest_problem = store.window.seq_problem(v, last_seq)
        assert (latest_problem is None) == applied, latest_problem
        assert "DAMAGED at rest" in rephub.format_status(hub.status())

        with TestAgent(hub.address, "a1", secrets_by_id["a1"]).connect() as agent:
            _, plan = agent.attach("v", vol, state=p.VolumeState.CLEAN)
            assert plan == p.SyncPlan.VERIFY
            wait_until(lambda: v.state == rephub.VolState.CONSISTENT and v.sync is None, 30,
                       "the verify to converge")
        store.applier.wait_applied(store.journal.durable_seq)
        with open(os.path.join(data_dir, "volumes", "v", "replica"), "rb") as f:
            assert f.read() == bytes(vol.buf)
        assert store.window.seq_problem(v, store.journal.last_seq) is None
    finally:
        hub.shutdown(grace=5)
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the hub log"


def rot(data_dir: str, name: str, offset: int) -> None:
    """Flip 16 bytes of a replica in place, as bit rot at rest would."""
    with open(os.path.join(data_dir, "volumes", name, "replica"), "r+b") as f:
        f.seek(offset)
        rotten = bytes(b ^ 0xFF for b in f.read(16))
        f.seek(offset)
        f.write(rotten)


@pytest.mark.parametrize("found_by", ["read", "scrub"])
def test_replica_rot_is_never_served_and_is_resynced(tmp_path, found_by, caplog):
    """A read that meets a chunk failing its checksum raises, never returns the
    rot; the scrub finds rot nobody read; either way the volume is verified
    against its agent, which rewrites the chunk, and the fault clears."""
    agents = str(tmp_path / "agents")
    secrets_by_id = make_agents_file(agents, "a1")
    data_dir = str(tmp_path / "data")
    hub = rephub.Hub(data_dir, agents, heartbeat=0.2,
                     scrub_interval=0.3 if found_by == "scrub" else 0)
    hub.start()
    try:
        rng = random.Random(17)
        mv = MemVolume(2 * MiB, rng.randbytes(2 * MiB))
        with TestAgent(hub.address, "a1", secrets_by_id["a1"]).connect() as agent:
            agent.attach("v", mv)
            vol = hub.store.volume("v")
            wait_until(lambda: vol.state == rephub.VolState.CONSISTENT and vol.sync is None, 20,
                       "the initial sync")
            hub.store.applier.wait_applied(hub.store.journal.durable_seq)
            rot(data_dir, "v", 5 * 65536 + 100)
            if found_by == "read":
                with pytest.raises(rephub.ReplicaDamaged):
                    hub.store.window.read_at(vol, hub.store.journal.durable_seq, 5 * 65536, 4096)
            wait_until(lambda: "replica damaged" in {d["fault"] for d in vol.health.report("v")}
                       or vol.last_sync and vol.last_sync["plan"] == "VERIFY", 20,
                       "the damage to be found")
            wait_until(lambda: vol.last_sync is not None and vol.last_sync["plan"] == "VERIFY"
                       and vol.sync is None and vol.state == rephub.VolState.CONSISTENT, 30,
                       "the verify to repair it")
            assert not vol.health.report("v"), vol.health.report("v")
            got = hub.store.window.read_at(vol, hub.store.journal.durable_seq, 0, 2 * MiB)
            assert got == bytes(mv.buf)
            if found_by == "scrub":
                assert "scrub of v: 1 damaged chunks" in caplog.text
                assert "scrub of v" in rephub.format_status(hub.status())
    finally:
        hub.shutdown(grace=5)


@pytest.mark.parametrize("found_by", ["read", "scrub"])
def test_a_record_rotten_between_append_and_apply_is_found_and_resynced(
        tmp_path, monkeypatch, found_by, caplog):
    """The applier copies a record's payload into the replica without reading
    it, so a payload that rots in the journal before it is applied reaches the
    replica.  The replica's sums of the chunks the WRITE covered wholly come
    from the data the agent sent, not from that copy: a read or the scrub
    finds the damage, and the verify fetches the chunk from the agent again."""
    monkeypatch.setattr(rephub, "APPLY_DELAY", 3600.0)   # applied when a reader asks
    monkeypatch.setattr(rephub, "APPLY_POLL", 3600.0)
    agents = str(tmp_path / "agents")
    secrets_by_id = make_agents_file(agents, "a1")
    data_dir = str(tmp_path / "data")
    hub = rephub.Hub(data_dir, agents, heartbeat=0.2, scrub_interval=0)
    hub.start()
    chunk = rephub.CHECK_CHUNK
    try:
        rng = random.Random(23)
        mv = MemVolume(2 * MiB, rng.randbytes(2 * MiB))
        with TestAgent(hub.address, "a1", secrets_by_id["a1"]).connect() as agent:
            vid, _ = agent.attach("v", mv)
            vol, store = hub.store.volume("v"), hub.store
            wait_until(lambda: vol.state == rephub.VolState.CONSISTENT and vol.sync is None, 20,
                       "the initial sync")
            store.applier.wait_applied(store.journal.durable_seq)
            data = rng.randbytes(2 * chunk)              # chunks 5 and 6, wholly
            mv.write(5 * chunk, data)
            agent.expect_ack(agent.write(vid, 5 * chunk, data))
            rec = store.journal.record(store.journal.durable_seq)
            assert (rec.offset, rec.length) == (5 * chunk, 2 * chunk)
            with open(store.journal.log.path(rec.segment), "r+b") as f:
                f.seek(rec.pos + chunk + 100)            # in chunk 6
                rotten = bytes(b ^ 0xFF for b in f.read(16))
                f.seek(rec.pos + chunk + 100)
                f.write(rotten)
            store.applier.wait_applied(rec.seq)
            with open(os.path.join(data_dir, "volumes", "v", "replica"), "rb") as f:
                f.seek(6 * chunk + 100)
                assert f.read(16) == rotten, "the applier copied the rotten payload"
            if found_by == "read":
                assert store.window.read_at(vol, rec.seq, 5 * chunk, chunk) == data[:chunk]
                with pytest.raises(rephub.ReplicaDamaged):
                    store.window.read_at(vol, rec.seq, 6 * chunk, 4096)
            else:
                store.faults.scrub(vol, rephub.RateLimiter(0), threading.Event())
                assert "scrub of v: 1 damaged chunks" in caplog.text
            wait_until(lambda: vol.last_sync is not None and vol.last_sync["plan"] == "VERIFY"
                       and vol.sync is None and vol.state == rephub.VolState.CONSISTENT, 30,
                       "the verify to repair it")
            store.applier.wait_applied(store.journal.durable_seq)
            assert not vol.health.report("v"), vol.health.report("v")
            got = store.window.read_at(vol, store.journal.durable_seq, 0, 2 * MiB)
            assert got == bytes(mv.buf)
    finally:
        hub.shutdown(grace=5)
