#!/usr/bin/env python3
"""rephub: the hub on the recovery site — server, durable journal, replica store, sync.

Read this file top to bottom; it follows the path of a write.

Lock order, outermost first (a thread that holds two of these took the one on
the left first; what each thread takes: docs/DESIGN.md "Threads and locks")::

    Volume.attach_lock → Attachments.sync_lock → Volume.lock → Health.lock
    Volume.attach_lock → Attachments.sync_lock → Applier.applied_cond
    Volume.attach_lock → Journal.lock → Volume.lock, Health.lock, SegmentLog.read_lock
    Volume.attach_lock → Applier.applied_cond, SyncJob.cond, Acker.cond
    VolumeStore.apply_lock → Applier.applied_cond → Journal.lock
    VolumeStore.apply_lock → SegmentLog.read_lock
    VolumeStore.lock → Health.lock
    AgentSocket.send_lock → TLSStream.lock

Server (docs/SEMANTICS.md "Connection and handshake")
    ``Hub`` owns a listening socket (optionally TLS).  Each accepted agent
    connection gets one thread running ``AgentConnection``: ``setup``
    (TLS + HMAC handshake, one 10 s deadline for all of it, payloads of at
    most MAX_HANDSHAKE_PAYLOAD until AUTH_OK: PROTOCOL.md [SE-3]; the accept
    loop caps connections in total and unauthenticated ones per address,
    and backs off when out of descriptors), ``handle`` (a sequential blocking
    recv loop dispatching to ``on_<TYPE>`` methods) and ``finish``; an
    exception in one connection is logged with the peer's address and never
    reaches the server.  Every send on a connection goes through
    ``AgentConnection.send`` (one send lock).

Durability (docs/DESIGN.md rule 6)
    A WRITE, ZERO, READ_REPLY or CHECKPOINT is appended to the ``Journal``
    (segment files, one CRC per record) by the recv loop, which then goes on
    reading.  One committer thread runs ``fdatasync``: each call covers every
    record appended while the previous one ran (group commit).  The
    connection's acker thread sends the ACK (or SYNCED) for a record only once
    the committer has made it durable, so ACKs leave in stream order and each
    one means "this and everything before it is on disk".

Replica store
    ``VolumeStore`` keeps ``DIR/volumes/<name>/replica`` (sparse raw file) and
    ``metadata.json`` (atomic: temp + fsync + rename + fsync dir).  The applier
    thread copies durable journal records into the replicas in journal
    order (= stream order, docs/DESIGN.md rule 1).  Before it overwrites a
    range it saves the bytes it replaces as an UNDO record (holes stay holes,
    so a first write costs nothing), so the replica is always the newest
    state and the volume as it was at an earlier point is the replica with
    the undo records walked back from newest to that point
    (``RecoveryWindow.read_at``).  On start the store truncates a torn journal
    tail (CRC) and applies what was journaled but not applied.  Damage at
    rest elsewhere in a segment is never cut: it is copied to
    ``DIR/quarantine``, its lost records keep their seqs
    (``RecordKind.LOST``), and the volumes they touched are verified against
    their agents.  Each replica has a CRC-32 per 64 KiB chunk
    (``ReplicaSums``): every read checks it, and a scrub thread reads every
    replica now and then; rot is verified away, never served.

    The applier works in batches whose records do not overlap: it captures
    and appends the batch's UNDO records, appends an UNDO_COMMIT, fdatasyncs
    the undo log, and only then writes the replicas; ``applied.json`` moves
    forward only after the replicas are fdatasync'ed.  So after any crash the
    undo of a half-applied batch is complete, and undo records after the last
    UNDO_COMMIT (their batch never touched a replica) are dropped at start.
    A ZERO (or a zero READ_REPLY) punches holes where the replica has data
    (writes zeroes where the file system cannot): holes stay holes, and a
    zeroed range gives its space back.

Points in time (for recovery)
    Every record carries a global ``seq`` and a wall-clock ``time_ns``.  A
    point is a seq: the state of every volume right after that record.  It is
    named ``latest``, by a checkpoint (a CHECKPOINT record of the volume's
    agent), or by an RFC 3339 UTC time (the newest record not after it).  The
    window is bounded by ``--journal-retention`` and ``--journal-max-bytes``:
    applied journal segments older than that are dropped, and with them the
    undo records no point in the window needs.

When the hub's own storage fails (PROTOCOL.md RP-10, RP-11)
    A journal append is all or nothing.  A record the journal cannot take
    (disk full, I/O error) is answered ERROR(IO_ERROR), and so is every
    later record of that connection: a hole in the stream is never followed
    by an ACK, and the agent keeps it all marked.  ``Health`` holds each
    fault (journal full, journal/replica/metadata I/O error, replica
    damaged) for status and metrics, logged once per transition.  The
    storage watcher thread polls with backoff; when there is room again the
    journal takes records, each refused connection ends with GOODBYE, and
    the agent's next ATTACH gets a plan that covers what it kept marked.
    The applier retries a failed replica write with backoff.  A failed
    fdatasync of the journal is not retried (what reached the disk is
    unknown): nothing after it is acknowledged until a restart.

Stopping
    SIGTERM/SIGINT: stop accepting, let each recv loop finish the frame it is
    on, send the pending ACKs, GOODBYE, make journal and replicas durable,
    exit 0.  A second signal exits at once (status 128+signal): every file
    is append-only with CRCs or replaced atomically, so nothing is corrupt.

Sync (docs/SEMANTICS.md "Sync")
    On ATTACH the hub picks a plan (FULL, DIRTY, VERIFY or NONE) and a
    ``SyncJob`` thread per volume drives it: pipelined READs (several in
    flight), DIRTY_QUERY, CHECKSUM_QUERY, and for a FULL sync on a connection
    granted feature EXTENTS, EXTENT_QUERY first so that only data is READ.
    Replies arrive on the recv loop in stream order and are journaled like
    writes (an EXTENTS answer's zero extents as ZERO records), so a stale
    READ_REPLY can never overwrite a newer WRITE (docs/DESIGN.md rule 4).

Recovery (PROTOCOL.md "Recovery (remote IO)")
    A recovery agent opens a session (``Recovery.open``) on a volume at a
    point and sends its VM's IO as RREAD/RWRITE.  TEST: the volume at the
    point (``read_at``) with the session's writes laid over it from an
    ``Overlay`` (``DIR/scratch``, deleted at close and at start); the journal
    and replica never see them.  FAILOVER, or ``rephub.py promote``
    (``Recovery.promote``/``Roles.promote``): under the journal lock the
    volume is marked promoted (protected-side writes get ERROR(ROLE) from that
    instant) and its journal entries after the point are set aside: never
    applied again, kept and exportable (``export --set-aside``) until
    ``release``; then the replica is rolled back to the point by writing
    ``read_at(point)`` over the ranges the set-aside records touched (redone at
    open if interrupted).  The session's writes are then journaled like any.
    Points where a volume was not crash-consistent are refused: before its
    first full sync, and inside a DIRTY/VERIFY resync (``meta["resyncs"]``:
    from the last record before the resync began to the one at which it
    completed), which is also where an agent's unsolicited DIRTY_MAP starts
    one: the stream lacks a write from there (PROTOCOL.md [SY-20]).

Fail-back (PROTOCOL.md "Fail-back")
    The original agent comes back offering FAILBACK: its ATTACH of the
    promoted volume gets plan DEMOTED (its writes stay refused).  ``rephub.py
    failback`` (``Hub.failback``, ``Failback``): FAILBACK_BEGIN; the late
    writes (the agent's dirty map, or the chunks whose checksums differ) READ
    into ``DIR/volumes/<name>/failback-<n>/`` and reported with the set-aside
    entries and the delta for the operator to confirm; the recovery session
    fenced (RWRITE refused); every region written since the promotion, plus
    the late writes, sent as PUTs; FAILBACK_END(DONE), on whose ACK the recv
    loop makes the volume protected again; the recovery session closed with
    GOODBYE.  Set-aside entries stay until ``release``.

Control
    ``DIR/control.sock`` (unix stream socket): one JSON request line, JSON
    reply lines (see ``ControlServer``).  ``rephub.py status`` uses it
    (``--watch`` redraws it).  ``serve --metrics-listen HOST:PORT`` serves
    the same status document as Prometheus text on ``/metrics``
    (``hub_metrics``, ``MetricsServer``).

Journal record layout (``RECORD``), network byte order::

    offset size field
     0      4  magic          0x524A5231 ("RJR1")
     4      1  kind           RecordKind
     5      1  flags          RECORD_FROM_SYNC: came from a READ_REPLY
     6      2  reserved       0
     8      8  seq            global sequence number, contiguous from 1
    16      8  time_ns        wall clock at append (never goes backwards)
    24      4  volume         hub volume id (0 for CHECKPOINT)
    28      4  payload_length bytes of payload after the header
    32      8  offset         byte offset in the volume
    40      8  length         byte length of the range
    48      4  payload_crc    CRC-32 of the payload
    52      4  header_crc     CRC-32 of bytes 0..51
"""

from __future__ import annotations

import argparse
import array
import bisect
import collections
import ctypes
import dataclasses
import enum
import errno
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import operator
import os
import secrets
import select
import shutil
import signal
import socket
import ssl
import stat
import struct
import sys
import threading
import time
import zlib
from typing import Callable

import protocol as p
from ops import (LogThrottle, MetricsServer, accept_forever, add_status_options, fmt_bytes,
                 format_table, parse_host_port, print_line, prometheus_text, watch)

log = logging.getLogger("rephub")

# ---------------------------------------------------------------------------
# Constants

#: TLS, HELLO..AUTH_OK must be done within this from accept, the bytes of a
#: frame included (docs/SEMANTICS.md "Connection and handshake";
#: PROTOCOL.md "Security considerations"); ``serve --handshake-timeout``.
HANDSHAKE_TIMEOUT = 10.0
#: The hub holds at most this many connections (``--max-connections``); one
#: more is closed at accept.  Each costs a thread, so this bounds the threads
#: unauthenticated peers can make the hub run.
MAX_CONNECTIONS = 256
#: ... and at most this many unauthenticated ones from one address
#: (``--max-unauthenticated-per-address``), so one host cannot take them all.
MAX_UNAUTHENTICATED_PER_ADDRESS = 16
#: How often a recv loop waiting between frames looks at the stop flag.
POLL_INTERVAL = 0.2
#: A peer that stalls inside a frame for this long is cut off.
FRAME_TIMEOUT = 60.0
#: The hub pings every connection this often; status shows the RTT.
HEARTBEAT_INTERVAL = 5.0
#: A connection from which nothing (not even a PONG) arrived for this many
#: heartbeat intervals is half-open or hung: the heartbeat closes it.
PEER_SILENCE_INTERVALS = 4
#: FULL/DIRTY syncs read pieces of this size (chunk aligned) ...
SYNC_PIECE = 1024 * 1024
#: ... with this many pieces' worth of bytes in flight, so the agent's disk and
#: the link stay busy (32 MiB: the dense 1 GiB sync takes about 3/4 of the time
#: it took with 8 MiB).  A READ is in flight until its reply arrives, not until
#: it is durable: a group commit's fdatasync must not stall the stream (the
#: kernel's dirty-page limits hold back a journal faster than its disk) ...
SYNC_WINDOW = 32
#: ... in at most this many READs: small pieces (a sparse volume's data, dirty
#: extents) keep the link busy too.
SYNC_MAX_READS = 128
#: ... sent this many at a time (``SyncJob.pull``).
SYNC_BATCH = 8
#: With feature EXTENTS, a FULL sync first asks which parts read as zeroes,
#: this much per EXTENT_QUERY (an agent answers from its disk's allocation map,
#: so a large span costs it little) ...
EXTENT_SPAN = 1024 ** 3
#: ... with this many queries in flight, so the next answer is there when the
#: READs of the data in the previous one are out.
EXTENT_WINDOW = 2
#: A zero extent is journaled as ZERO records of at most this, which bounds
#: the undo one record can need on a replica already holding data.
ZERO_RECORD_MAX = 64 * 1024 * 1024
#: Feature bits this hub implements: it grants those the agent offers (VN-3).
HUB_FEATURES = p.Feature.EXTENTS | p.Feature.FAILBACK | p.Feature.GOODBYE_CODE
#: How every frame starts on the wire: tells a plaintext agent from a TLS one.
MAGIC_BYTES = struct.pack("!I", p.MAGIC)
#: The agent's answers to a SyncJob's requests (their request ids are the hub's).
SYNC_ANSWERS = frozenset({p.MsgType.READ_REPLY, p.MsgType.DIRTY_MAP, p.MsgType.CHECKSUMS,
                          p.MsgType.EXTENTS})
#: VERIFY asks checksums for ranges of this many chunks per CHECKSUM_QUERY.
VERIFY_CHUNKS_PER_QUERY = 256
VERIFY_WINDOW = 4
#: Long syncs log progress at INFO this often.
PROGRESS_INTERVAL = 5.0
#: A new segment file is started when the current one reaches this size.
SEGMENT_BYTES = 64 * 1024 * 1024
#: The journal keeps segments that retention dropped as spares, up to this many
#: bytes and while a 1/SPARE_FREE_FRACTION of its file system stays free, and
#: writes its next segments over them (``SegmentLog``): an overwrite of
#: allocated blocks needs no block allocation and its fdatasync no metadata
#: commit, about half the time of an append's on ext4.
SPARE_BYTES = 1024 * 1024 * 1024
SPARE_FREE_FRACTION = 8
#: In a segment written over a spare, the journal asks the kernel to read this
#: much of the spare ahead of its appends of records smaller than
#: READ_AHEAD_RECORD (``SegmentLog._read_ahead``).
READ_AHEAD = 1024 * 1024
READ_AHEAD_RECORD = 64 * 1024
#: How the scan names a record a recycled segment holds from its earlier use.
STALE_RECORD = "a record of the file's earlier use,"
#: The applier applies at most this much in one batch (one undo fdatasync).
APPLY_BATCH_BYTES = 64 * 1024 * 1024
APPLY_BATCH_RECORDS = 256
#: The applier persists how far it got at least this often while busy.
APPLY_PERSIST_INTERVAL = 1.0
#: The applier lets durable records gather this long (or up to APPLY_BATCH_BYTES)
#: before a batch, so its undo and replica fdatasyncs stay few and large and do
#: not compete with the journal's; a reader waiting in ``wait_applied`` cuts it short.
APPLY_DELAY = 0.25
#: ... and looks whether a batch is due this often, not at every commit (the
#: ackers wait for those; an applier woken beside them only takes the GIL).
APPLY_POLL = 0.05
#: The applier and the scrub run at this nice value (``background_priority``):
#: their batches are work off the path of any write, and at the same priority
#: a thread woken for a write (here, in the agent, in QEMU) waits for the
#: scheduler to preempt a batch of several milliseconds of CPU.
BACKGROUND_NICE = 10
DEFAULT_RETENTION = 24 * 3600.0
#: The scrub reads every replica this often, at most this fast.
DEFAULT_SCRUB_INTERVAL = 24 * 3600.0
DEFAULT_SCRUB_RATE = 64 * 1024 * 1024
DEFAULT_MAX_JOURNAL_BYTES = 16 * 1024 ** 3
#: Replica reads and exports go in blocks of this size.
IO_BLOCK = 1024 * 1024
ZERO_BLOCK = bytes(IO_BLOCK)

#: Fail-back PUTs carry at most this much each (PROTOCOL.md "Fail-back") ...
FAILBACK_PIECE = 1024 * 1024
#: ... with this many in flight; the late-writes READs go the same way.
FAILBACK_WINDOW = 8
#: The agent answers FAILBACK_BEGIN/END (it reconfigures QSD over QMP) and every
#: PUT, READ or query of a fail-back within this; else the fail-back fails.
FAILBACK_ANSWER_TIMEOUT = 120.0
#: The operator has this long to confirm a fail-back's report; then it is declined.
FAILBACK_CONFIRM_TIMEOUT = 3600.0
FAILBACK_DIR = "failback-{n}"
LATE_WRITES_IMAGE = "late-writes.img"
LATE_WRITES_JSON = "late-writes.json"

#: How a point's time is written (PROTOCOL.md RC-8), for help texts and errors.
POINT_EXAMPLE = "2026-11-25T18:00:00Z"
CONTROL_SOCKET = "control.sock"
LOCK_FILE = "lock"
QUARANTINE_DIR = "quarantine"
#: Each volume's replica has a CRC-32 per CHECK_CHUNK in ``checksums`` (4 bytes
#: per 64 KiB: 64 MiB per TiB), kept by the applier and checked by every read.
CHECKSUMS_FILE = "checksums"
CHECK_CHUNK = 64 * 1024
CHECK_ENTRY = struct.Struct("!I")
#: Frames whose data the hub journals: their chunks' sums are taken as the CRC
#: of their payload is checked (DataSums).
SUMMED_FRAMES = frozenset({p.MsgType.WRITE, p.MsgType.READ_REPLY, p.MsgType.RWRITE})
#: The journal keeps the DataSums of at most this many records not yet applied
#: (about 20 MiB of memory); past it, as after a restart, the applier reads
#: the chunks back.
DATA_SUMS_KEPT = 64 * 1024
#: ReplicaSums.flush writes at most this many sums per pwrite (1 MiB).
SUMS_PER_WRITE = 256 * 1024
HUB_FILE = "hub.json"
APPLIED_FILE = "applied.json"
#: A full journal takes records again once its file system has this much free
#: (two of the largest records), or a sixteenth of it on a smaller one.
RESUME_FREE_BYTES = 2 * p.MAX_PAYLOAD
#: The storage watcher retries a failed journal or replica after this long,
#: doubling up to the maximum.
FAULT_RETRY_MIN = 0.2
FAULT_RETRY_MAX = 10.0


class RecordKind(enum.IntEnum):
    """What a journal or undo record holds."""

    WRITE = 1        # payload = data for [offset, offset+length)
    ZERO = 2         # no payload: the range reads as zeroes
    CHECKPOINT = 3   # payload = CHECKPOINT_PAYLOAD: a named point for one agent
    UNDO = 4         # undo log: payload = the range's bytes before record `seq`
    UNDO_COMMIT = 5  # undo log: every UNDO up to `seq` is durable (batch end)
    LOST = 6         # in memory only: a journal record lost to damage at rest


RECORD_FROM_SYNC = 1 << 0

RECORD_MAGIC = 0x524A5231  # "RJR1"
RECORD_MAGIC_BYTES = struct.pack("!I", RECORD_MAGIC)
#: The 52 bytes the header CRC covers (layout in the module docstring).
RECORD_BODY = struct.Struct("!IBBHQQIIQQI")
RECORD = struct.Struct("!IBBHQQIIQQII")
#: UNDO payload: u32 extent count, the extents, then the data extents' bytes
#: in order.  An extent: u64 offset relative to the record's offset, u64
#: length, u8 kind (UNDO_HOLE or UNDO_DATA), 7 bytes reserved.
UNDO_COUNT = struct.Struct("!I")
UNDO_EXTENT = struct.Struct("!QQB7x")
UNDO_HOLE = 0
UNDO_DATA = 1
#: CHECKPOINT payload: u16 agent id length + agent id, u16 name length + name.
TEXT_LEN = struct.Struct("!H")


class VolState(str, enum.Enum):
    """A replica's state as persisted and shown in status
    (docs/SEMANTICS.md "Plans")."""

    INCONSISTENT = "inconsistent"  # its first full sync has not completed
    SYNCING = "syncing"            # a DIRTY or VERIFY resync is running
    CONSISTENT = "consistent"


class Role(str, enum.Enum):
    """Which side writes a volume's replica (persisted in metadata.json)."""

    PROTECTED = "protected"  # its agent's stream; the recovery site reads
    PROMOTED = "promoted"    # a recovery session (RC-7); the agent's writes are refused
                             # until a fail-back makes it PROTECTED again (FB-*)


class Fault(str, enum.Enum):
    """What the hub's own storage is failing at (``status``'s ``degraded``)."""
    JOURNAL_FULL = "journal full"
    JOURNAL_IO = "journal I/O error"
    REPLICA_IO = "replica I/O error"
    METADATA_IO = "metadata I/O error"
    REPLICA_DAMAGED = "replica damaged"


#: The faults that stop the journal taking records.
JOURNAL_FAULTS = (Fault.JOURNAL_FULL, Fault.JOURNAL_IO)


#: The errnos of a full file system or quota.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def journal_fault_of(err: OSError) -> Fault:
    """JOURNAL_FULL for a full disk or quota, else JOURNAL_IO."""
    return Fault.JOURNAL_FULL if err.errno in NO_SPACE else Fault.JOURNAL_IO


class Health:
    """The faults of the hub's storage now, per hub (volume None) and per volume.

    Each fault is logged once when it begins and once when it ends, never
    per frame.  Any thread.

    Threads::

        *                    any thread; takes lock
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.faults: dict[tuple[Fault, str | None], tuple[str, int]] = {}  # -> (detail, since)

    def fail(self, fault: Fault, detail: str, volume: str | None = None) -> None:
        with self.lock:
            new = (fault, volume) not in self.faults
            if new:
                self.faults[(fault, volume)] = (detail, time.time_ns())
        if new:
            log.error("degraded: %s%s: %s", fault.value,
                      f" on volume {volume}" if volume else "", detail)

    def clear(self, fault: Fault, volume: str | None = None) -> None:
        with self.lock:
            old = self.faults.pop((fault, volume), None)
        if old is not None:
            log.warning("recovered: %s%s ended (began %s)", fault.value,
                        f" on volume {volume}" if volume else "", fmt_time_ns(old[1]))

    def active(self, fault: Fault) -> list[str | None]:
        """The volumes (None: the hub) that suffer ``fault`` now."""
        with self.lock:
            return [v for f, v in self.faults if f == fault]

    def journal_fault(self) -> str | None:
        """Why the journal refuses records now, or None."""
        with self.lock:
            for fault in JOURNAL_FAULTS:
                if (fault, None) in self.faults:
                    return f"{fault.value}: {self.faults[(fault, None)][0]}"
        return None

    def report(self, volume: str | None = None) -> list[dict]:
        """Every fault (``volume`` None), or those a volume suffers: its own and
        the hub's."""
        with self.lock:
            items = sorted(self.faults.items(), key=lambda kv: kv[1][1])
        return [dict(fault=f.value, detail=d, since=fmt_time_ns(t), volume=v)
                for (f, v), (d, t) in items if volume is None or v in (None, volume)]


class JournalRefused(p.RequestError):
    """The journal could not take a record: nothing of it is in the journal."""

    code = p.ErrorCode.IO_ERROR


class StoreError(Exception):
    """The data directory cannot be used as it is (corrupt, locked, ...)."""


class PointError(p.RequestError):
    """A point in time that is unknown, outside the window, or not consistent."""

    code = p.ErrorCode.BAD_POINT


# ---------------------------------------------------------------------------
# Small file helpers


def background_priority() -> None:
    """Lower the calling thread's CPU priority to BACKGROUND_NICE (Linux nice
    is per thread).  Only ever lowered, so it needs no privilege."""
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < BACKGROUND_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, BACKGROUND_NICE)
    except OSError as err:
        log.debug("thread %s keeps its priority: %s", threading.current_thread().name, err)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Every file the hub creates: replicas, journal and undo segments, metadata,
#: the lock file.  They hold the protected disks' contents, so only the hub's
#: user may read them; ``os.open`` modes are masked by the umask, never widened.
PRIVATE_FILE = 0o600
#: Every directory the hub creates.
PRIVATE_DIR = 0o700


def makedirs_private(path: str, exist_ok: bool = True) -> None:
    """``os.makedirs`` whose every new directory is PRIVATE_DIR, intermediate ones
    included (``os.makedirs`` gives those the umask's default mode)."""
    head = os.path.dirname(path)
    if head and head != path and not os.path.isdir(head):
        makedirs_private(head)
    try:
        os.mkdir(path, PRIVATE_DIR)
    except FileExistsError:
        if not exist_ok or not os.path.isdir(path):
            raise


def private_data_dir(path: str) -> None:
    """Create the data directory 0700, or warn if an existing one is open to others."""
    if not os.path.isdir(path):
        makedirs_private(path)
        return
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        log.warning("data directory %s has mode %04o: other local users can reach the "
                    "replicas and journal in it; fix: chmod 700 %s", path, mode, path)


def atomic_write(path: str, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_json(path: str, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def data_extents(fd: int, offset: int, length: int):
    """Yield (offset, length) of the allocated (data) parts of a range of a file."""
    pos, end = offset, offset + length
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no data after pos
                return
            raise
        if start >= end:
            return
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        yield start, stop - start
        pos = stop


def _fallocate():
    """libc's fallocate(2) (Linux), or None: the os module has no punch-hole mode."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _fallocate()
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: Cleared when the file system refuses to punch holes (EOPNOTSUPP): zeroes are written.
punch_holes = _FALLOCATE is not None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range of a file, which then reads as zeroes (its size kept);
    False where the file system cannot (the caller writes zeroes)."""
    global punch_holes
    if not punch_holes:
        return False
    if _FALLOCATE(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        log.info("this file system cannot punch holes (%s); zero ranges are written as "
                 "zeroes", os.strerror(err))
        punch_holes = False
        return False
    raise OSError(err, f"fallocate(PUNCH_HOLE) at {offset} len {length}: {os.strerror(err)}")


def is_zero_buffer(data) -> bool:
    """``protocol.is_zero`` for any buffer, a memoryview too: one memcmp per
    IO_BLOCK against ZERO_BLOCK (a memoryview's own ``==`` goes byte by byte,
    some 40 times slower)."""
    view = memoryview(data)
    return all(ZERO_BLOCK.startswith(view[i:i + IO_BLOCK]) for i in range(0, len(view), IO_BLOCK))


def write_zeroes(fd: int, offset: int, length: int) -> None:
    """Make a range of a replica read as zeroes, only where data exists: each
    data extent becomes a hole (its space freed), or is overwritten with
    zeroes where the file system cannot punch holes.

    Holes are left alone, so a zero range on a sparse replica costs nothing.
    """
    for start, n in list(data_extents(fd, offset, length)):
        if punch_hole(fd, start, n):
            continue
        while n:
            k = min(n, IO_BLOCK)
            os.pwrite(fd, ZERO_BLOCK[:k], start)
            start += k
            n -= k


@functools.lru_cache(maxsize=8)
def zeroes_crc(n: int) -> int:
    """CRC-32 of ``n`` zero bytes (a chunk's, or the last chunk's length)."""
    return zlib.crc32(bytes(n))


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """(start, end) ranges sorted and merged where they overlap or touch."""
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def fmt_time_ns(ns: int | None) -> str:
    """A time as points are named by (RFC 3339 UTC, to the ns): what status and
    points show can be given back to ``--at`` and means exactly that instant."""
    if not ns:
        return "-"
    return p.format_point_time(ns)


# ---------------------------------------------------------------------------
# The hub


class Hub:
    """The server: listener, connections, store, heartbeat, control socket.

    ``start`` returns once the hub accepts connections; ``shutdown`` stops
    accepting, lets every connection finish its frame, makes everything
    durable and returns.  Used in-process by tests and by ``serve``.

    Threads::

        start, shutdown            main
        register, unregister       conn-HOST:PORT, when its handshake ends and when it ends
        checkpoint, reseed         control-N
        verify, failback           control-N, start to end
        status                     control-N and rephub-metrics
        count_error                any thread
    """

    def __init__(self, data_dir: str, agents_file: str, listen=("127.0.0.1", 0),
                 tls_cert: str | None = None, tls_key: str | None = None,
                 sync_rate: float = 0, retention: float = DEFAULT_RETENTION,
                 max_bytes: int = DEFAULT_MAX_JOURNAL_BYTES,
                 segment_bytes: int = SEGMENT_BYTES, heartbeat: float = HEARTBEAT_INTERVAL,
                 metrics_listen: tuple[str, int] | None = None,
                 scrub_interval: float = DEFAULT_SCRUB_INTERVAL,
                 scrub_rate: float = DEFAULT_SCRUB_RATE,
                 handshake_timeout: float | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 max_unauthenticated_per_address: int = MAX_UNAUTHENTICATED_PER_ADDRESS):
        self.store = VolumeStore(data_dir, retention, max_bytes, segment_bytes)
        self.recovery = Recovery(self)   # sessions and promotions, one per volume at a time
        self.handshake_timeout = handshake_timeout   # None: HANDSHAKE_TIMEOUT
        self.max_connections = max_connections
        self.max_unauthenticated_per_address = max_unauthenticated_per_address
        self.accept_log = LogThrottle(log)
        self.agents = AgentsFile(agents_file)
        self.listen_addr = listen
        self.tls = None
        if tls_cert:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.minimum_version = ssl.TLSVersion.TLSv1_2
            self.tls.load_cert_chain(tls_cert, tls_key)
        self.rate = RateLimiter(sync_rate)
        self.scrub_interval, self.scrub_rate = scrub_interval, RateLimiter(scrub_rate)
        self.heartbeat_interval = heartbeat
        self.stopping = threading.Event()
        self.conn_lock = threading.Lock()
        self.connections: set[AgentConnection] = set()
        self.listener: socket.socket | None = None
        self.threads: list[threading.Thread] = []
        self.control: ControlServer | None = None
        self.started_ns = time.time_ns()
        self.metrics_listen = metrics_listen
        self.metrics: MetricsServer | None = None
        self.error_lock = threading.Lock()
        self.errors: collections.Counter[str] = collections.Counter()  # kind -> WARNINGs

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()[:2]

    def count_error(self, kind: str) -> None:
        """Count a fault logged at WARNING, for status and /metrics.  Any thread."""
        with self.error_lock:
            self.errors[kind] += 1

    def start(self) -> None:
        self.store.open()
        self.store.faults.on_reopened = self._storage_recovered
        self.store.faults.on_damaged = self._verify_damaged
        self.store.start()
        scratch = os.path.join(self.store.dir, SCRATCH_DIR)
        if os.path.isdir(scratch) and os.listdir(scratch):
            log.info("discarding %d recovery test overlays left by a stopped hub",
                     len(os.listdir(scratch)))
        shutil.rmtree(scratch, ignore_errors=True)
        host, port = self.listen_addr
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(64)
        self.control = ControlServer(self)
        if self.metrics_listen is not None:
            try:
                self.metrics = MetricsServer(self.metrics_listen,
                                             lambda: hub_metrics(self.status()),
                                             "rephub-metrics", log)
            except OSError as err:
                raise OSError(err.errno, f"--metrics-listen {self.metrics_listen[0]}:"
                              f"{self.metrics_listen[1]}: {err.strerror}") from err
        loops = [(self._accept_loop, "accept"), (self._heartbeat_loop, "heartbeat")]
        if self.scrub_interval:
            loops.append((self._scrub_loop, "scrub"))
        for target, name in loops:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)
        log.info("hub %s listening on %s:%d%s, data %s", self.store.hub_id, *self.address,
                 " (TLS)" if self.tls else "", self.store.dir)

    def _accept_loop(self) -> None:
        """Accept thread: one connection thread per agent (``accept_forever``: it
        never dies and never spins)."""
        accept_forever(self.listener, self.stopping, self._start_connection, self.accept_log,
                       "connection", "raise the fd limit or --max-connections lower")

    def _start_connection(self, sock: socket.socket, addr) -> bool:
        """Accept thread: start ``sock``'s connection thread, or close it at once
        (without a byte: [HS-1]) when the hub holds ``max_connections``, or
        ``max_unauthenticated_per_address`` unauthenticated ones from its address.
        Raises if the thread cannot start (the connection is forgotten)."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as err:   # reset before we got to it
            log.debug("connection from %s gone at accept: %s", addr[0], err)
            sock.close()
            return False
        with self.conn_lock:
            refused = None
            if len(self.connections) >= self.max_connections:
                refused = ("limit", f"{len(self.connections)} connections open "
                                    f"(--max-connections {self.max_connections})")
            else:
                waiting = sum(1 for c in self.connections
                              if c.host == addr[0] and c.state is ConnState.HANDSHAKE)
                if waiting >= self.max_unauthenticated_per_address:
                    refused = ("per-address", f"{waiting} unauthenticated connections from it "
                               f"(--max-unauthenticated-per-address "
                               f"{self.max_unauthenticated_per_address})")
            if refused is None:
                conn = AgentConnection(self, sock, addr)
                self.connections.add(conn)
        if refused is not None:
            sock.close()
            self.accept_log.warning(refused[0], "connection from %s closed at once: %s",
                                    addr[0], refused[1])
            return False
        try:
            conn.thread = threading.Thread(target=conn.run, name=f"conn-{conn.peer}",
                                           daemon=True)
            conn.thread.start()
        except BaseException:
            with self.conn_lock:
                self.connections.discard(conn)
            raise
        return True

    def _heartbeat_loop(self) -> None:
        """Heartbeat thread: PING every authenticated connection."""
        while not self.stopping.wait(self.heartbeat_interval):
            with self.conn_lock:  # every authenticated one: recovery connections too
                conns = [c for c in self.connections if c.state == ConnState.ESTABLISHED]
            silent_limit = PEER_SILENCE_INTERVALS * self.heartbeat_interval
            for conn in conns:
                silent = time.monotonic() - conn.io.last_recv
                if silent > silent_limit:
                    conn.abort(f"nothing received for {silent:.1f} s, PINGs unanswered: "
                               "the peer is hung or the connection half-open")
                    continue
                try:
                    conn.ping()
                except (OSError, ConnectionClosed) as err:
                    conn.abort(f"heartbeat send failed: {err}")

    def _storage_recovered(self) -> None:
        """Storage watcher: the journal takes records again; every connection whose
        records were refused ends, so that its agent attaches again (RP-10)."""
        with self.conn_lock:
            refusing = [c for c in self.connections if c.refusing is not None]
        for conn in refusing:
            conn.say_goodbye(STORAGE_RECOVERED, p.GoodbyeCode.STORAGE_RECOVERED)

    def _verify_damaged(self, vol: Volume) -> None:
        """Rot in ``vol``'s replica (any thread): verify it now if its agent is attached
        (it rewrites what differs); else the next ATTACH does (pending VERIFY)."""
        conn = vol.attached_to
        if conn is not None and vol.id not in conn.attached.demoted and vol.sync is None:
            try:
                conn.attached.start_sync(vol, p.SyncPlan.VERIFY)
            except (p.ReplicationError, OSError, ConnectionClosed) as err:
                log.warning("volume %s: verify of the damaged replica not started: %s",
                            vol.name, err)

    def _scrub_loop(self) -> None:
        """Scrub thread: every ``scrub_interval``, check each replica against its
        checksums at ``scrub_rate`` at most; rot found is verified away."""
        background_priority()
        while not self.stopping.wait(self.scrub_interval):
            for vol in list(self.store.volumes.values()):
                try:
                    vol.last_scrub = self.store.faults.scrub(vol, self.scrub_rate, self.stopping)
                except OSError as err:
                    log.error("scrub of %s failed: %s", vol.name, err)

    def register(self, conn: AgentConnection) -> None:
        """An agent authenticated.  Its older connections stay: one that has a
        volume loses it only when this one attaches that volume (take_over),
        so a recovery session of the same agent id leaves protection alone."""
        with self.conn_lock:
            others = [c.peer for c in self.connections
                      if c is not conn and c.agent_id == conn.agent_id]
        if others:
            log.info("agent %s: connected from %s as well as from %s", conn.agent_id, conn.peer,
                     ", ".join(others))

    def unregister(self, conn: AgentConnection) -> None:
        with self.conn_lock:
            self.connections.discard(conn)

    def checkpoint(self, volume: str, name: str) -> dict:
        """A checkpoint for every volume of ``volume``'s owner, durable on return."""
        vol = self.store.volume(volume)
        if vol is None:
            raise p.RequestError(f"no volume named {volume!r}", code=p.ErrorCode.NO_SUCH_VOLUME)
        rec = self.store.append_checkpoint(vol.owner, name)
        if not self.store.journal.wait_durable(rec.seq, timeout=60):
            raise p.RequestError("checkpoint not durable", code=p.ErrorCode.IO_ERROR)
        log.info("checkpoint %r of agent %s at seq %d (operator)", name, vol.owner, rec.seq)
        return dict(name=name, agent=vol.owner, seq=rec.seq, time=fmt_time_ns(rec.time_ns))

    def reseed(self, volume: str) -> dict:
        """``rephub.py reseed``: the next ATTACH of ``volume`` may bring another disk
        identity (VO-8); it is VERIFYed, so the replica becomes that disk.  A
        connection whose ATTACH was refused for its identity is closed so that
        its agent reconnects and attaches again now."""
        vol = self.store.volume(volume)
        if vol is None:
            raise p.RequestError(f"no volume named {volume!r}", code=p.ErrorCode.NO_SUCH_VOLUME)
        vol.update(reseed=True)
        with self.conn_lock:
            refused = [c for c in self.connections if vol.name in c.attached.refused_identity]
        for conn in refused:
            conn.abort(f"volume {vol.name} was re-seeded: the agent attaches it again")
        log.warning("volume %s re-seeded by the operator: the next ATTACH of agent %s may bring "
                    "another disk; it is verified against the replica", vol.name, vol.owner)
        return dict(volume=vol.name, owner=vol.owner, reconnected=len(refused))

    def verify(self, volume: str, repair: bool, progress=None, timeout: float = 3600.0) -> dict:
        """Online verify (control thread): compare ``volume`` with its agent's copy by
        checksums over the live connection, while replication goes on; with
        ``repair`` READ the differing chunks.  Returns once the comparison is done."""
        vol = self.store.volume(volume)
        if vol is None:
            raise p.RequestError(f"no volume named {volume!r}", code=p.ErrorCode.NO_SUCH_VOLUME)
        conn = vol.attached_to
        if conn is None or conn.closing.is_set():
            raise p.RequestError(f"volume {volume!r} is not attached: its agent is not "
                                 "connected, nothing to compare with", code=p.ErrorCode.BUSY)
        with vol.attach_lock, conn.attached.sync_lock:
            if vol.sync is not None and not vol.sync.finished:
                raise p.RequestError(f"volume {volume!r} is syncing ({vol.sync.plan.name}); "
                                     "verify again once it is done", code=p.ErrorCode.BUSY)
            job = SyncJob(conn, vol, p.SyncPlan.VERIFY, online=True, repair=repair)
            vol.sync = job
            conn.attached.jobs.add(job)
        if repair:
            job.begin()
        log.info("online verify of %s%s starts", vol.name, " with repair" if repair else "")
        job.start()
        deadline = time.monotonic() + timeout
        while job.is_alive() and time.monotonic() < deadline:
            job.join(0.5)
            if progress:
                progress(job.bytes_done, job.bytes_total)
        st = job.status()
        if not job.completed:
            raise p.RequestError(f"verify of {volume!r} did not complete: "
                                 f"{st['error'] or 'connection closed or timed out'}",
                                 code=p.ErrorCode.IO_ERROR)
        differing = [dict(offset=o, length=n) for o, n in job.differing]
        return dict(volume=vol.name, size=vol.size, chunk_size=job.chunk,
                    chunks=-(-vol.size // job.chunk), compared_bytes=job.bytes_done,
                    differing=differing, differing_bytes=sum(n for _, n in job.differing),
                    repaired=repair and bool(differing), bytes_fetched=job.bytes_fetched,
                    seconds=round(time.monotonic() - job.started, 3))

    # -- recovery (PROTOCOL.md "Recovery"; any thread) -----------------------------

    def failback(self, volume: str, agent_id: str, emit, confirm) -> dict:
        """Bring promoted ``volume`` home to ``agent_id`` (``rephub.py failback``;
        the control request thread): see ``Failback``.  Refused clearly unless
        the volume is promoted and its owner is connected with it attached DEMOTED."""
        vol = self.store.volume(volume)
        if vol is None:
            raise p.RequestError(f"no volume named {volume!r}", code=p.ErrorCode.NO_SUCH_VOLUME)
        if vol.role is not Role.PROMOTED:
            raise p.RequestError(f"volume {volume} is not promoted: nothing to fail back",
                                 code=p.ErrorCode.BAD_PHASE)
        if vol.owner != agent_id:
            raise p.RequestError(f"volume {volume} belongs to agent {vol.owner}, not "
                                 f"{agent_id}: a fail-back goes to the volume's owner",
                                 code=p.ErrorCode.NOT_OWNER)
        conn = vol.attached_to
        if (conn is None or conn.agent_id != agent_id or conn.closing.is_set()
                or vol.id not in conn.attached.demoted):
            raise p.RequestError(f"agent {agent_id} is not connected with volume {volume} "
                                 "attached DEMOTED: start repagent.py protect --accept-failback "
                                 "... on the original host", code=p.ErrorCode.BAD_PHASE)
        with self.recovery.lock:
            if vol.failback is not None and vol.failback.phase.running:
                raise p.RequestError(f"a fail-back of {volume} to agent {vol.failback.agent} "
                                     f"is already running ({vol.failback.phase.value})",
                                     code=p.ErrorCode.BUSY)
            if vol.name in self.recovery.sessions and self.recovery.sessions[vol.name] is None:
                raise p.RequestError(f"volume {volume} is being promoted", code=p.ErrorCode.BUSY)
            fb = vol.failback = Failback(self, vol, conn, emit, confirm)
        return fb.run()

    def status(self) -> dict:
        store, j = self.store, self.store.journal
        now = time.time_ns()
        first, last = j.record(j.first_seq), j.record(j.last_seq)
        vols = []
        for vol in sorted(list(store.volumes.values()), key=lambda v: v.name):
            job = vol.sync
            sync = job.status() if job is not None else vol.last_sync
            vols.append(dict(
                name=vol.name, id=vol.id, owner=vol.owner, state=vol.state.value,
                size=vol.size, chunk_size=vol.meta["chunk_size"],
                attached=vol.attached_to is not None, sync=sync,
                lag_bytes=vol.unapplied_bytes,
                lag_s=round((now - vol.unapplied_since_ns) / 1e9, 3)
                if vol.unapplied_since_ns else 0.0,
                last_ack=fmt_time_ns(vol.last_ack_ns),
                undo_records=len(vol.undo), replicated_bytes=vol.journaled_bytes,
                role=vol.role.value,
                demoted=vol.attached_to is not None and vol.id in vol.attached_to.attached.demoted,
                degraded=store.health.report(vol.name), last_scrub=vol.last_scrub,
                failback=vol.failback.status() if vol.failback is not None else None))
        with self.conn_lock:
            agents = [c.status() for c in self.connections if c.agent_id is not None
                      and c.state == ConnState.ESTABLISHED]
        with self.error_lock:
            errors = dict(self.errors)
        return dict(
            hub_id=store.hub_id, listen="%s:%d" % self.address, tls=self.tls is not None,
            started=fmt_time_ns(self.started_ns),
            journal=dict(first_seq=j.first_seq, last_seq=j.last_seq, durable_seq=j.durable_seq,
                         applied_seq=store.applier.applied_seq, bytes=j.log.total_bytes(),
                         undo_bytes=store.undo_log.total_bytes(), fdatasyncs=j.fdatasyncs,
                         commits=j.commits, spare_segments=len(j.log.spares),
                         spare_bytes=j.log.spare_total(),
                         recycled_segments=j.log.recycled,
                         oldest=fmt_time_ns(first.time_ns) if first else None,
                         newest=fmt_time_ns(last.time_ns) if last else None,
                         span_s=round((last.time_ns - first.time_ns) / 1e9, 3)
                         if first and last else 0.0,
                         damage=[dict(file=seglog.path(d["segment"]), start=d["start"],
                                      end=d["end"], problem=d["problem"], copy=d["copy"])
                                 for seglog in (j.log, store.undo_log) for d in seglog.damage],
                         lost_seqs=[seq for seq, _, _ in j.lost]),
            volumes=vols, agents=sorted(agents, key=lambda a: a["agent_id"]),
            sessions=self.recovery.status(), errors=errors,
            degraded=store.health.report())

    def shutdown(self, grace: float = 30.0) -> None:
        """Stop accepting, finish frames, make everything durable (the stopping thread)."""
        if self.listener is None:
            return
        log.info("hub stopping: no new connections; finishing current frames")
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=5)
        self.listener.close()
        self.store.closing.set()
        if self.control:
            self.control.close()
        if self.metrics:
            self.metrics.close()
        with self.conn_lock:
            conns = list(self.connections)
        deadline = time.monotonic() + grace
        for conn in conns:
            if conn.thread is not None:
                conn.thread.join(timeout=max(deadline - time.monotonic(), 0.1))
                if conn.thread.is_alive():
                    conn.abort("did not finish its frame in time")
                    conn.thread.join(timeout=5)
        self.store.close()
        self.listener = None
        log.info("hub stopped; journal durable up to seq %d, replicas up to seq %d",
                 self.store.journal.durable_seq, self.store.applier.applied_seq)


# ---------------------------------------------------------------------------
# Connections


class ConnState(enum.Enum):
    """Phases of an agent connection; ``AgentConnection.set_state`` enforces the order."""

    HANDSHAKE = "handshake"      # TLS, HELLO/HELLO_REPLY/AUTH: only those frames allowed
    ESTABLISHED = "established"  # AUTH_OK sent: the recv loop dispatches on_<TYPE>
    CLOSING = "closing"          # stopping: syncs stopped, ACKs flushed, GOODBYE
    CLOSED = "closed"


CONN_TRANSITIONS = {
    ConnState.HANDSHAKE: {ConnState.ESTABLISHED, ConnState.CLOSING},
    ConnState.ESTABLISHED: {ConnState.CLOSING},
    ConnState.CLOSING: {ConnState.CLOSED},
    ConnState.CLOSED: set(),
}


class ConnectionClosed(Exception):
    """The peer went away, or the connection is being torn down."""


class AgentConnection:
    """One agent connection: setup (handshake), handle (recv loop), finish.

    The connection thread runs ``run``; only it reads the socket.  ``send``
    may be called from any thread (acker, sync jobs, heartbeat).

    Threads::

        run                        conn-HOST:PORT: setup, then handle, then finish
        setup, handle, finish      conn-HOST:PORT
        recv_frame, handle_error   conn-HOST:PORT (the recv loop)
        set_state, refuse          conn-HOST:PORT
        send, send_error           any thread; takes AgentSocket.send_lock
        send_many                  any thread (the acker); takes AgentSocket.send_lock
        say_goodbye, abort         any thread (heartbeat, storage-watch, control-N, acker-HOST:PORT)
        ping                       heartbeat
        status                     control-N and rephub-metrics (Hub.status)
        *                          conn-HOST:PORT: the on_<TYPE> handlers of the recv loop
    """

    def __init__(self, hub: Hub, sock: socket.socket, addr):
        self.hub = hub
        self.store = hub.store
        self.peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        self.host = addr[0] if isinstance(addr, tuple) else str(addr)  # per-address limit
        self.handshake_timeout = hub.handshake_timeout or HANDSHAKE_TIMEOUT
        self.io = AgentSocket(sock, self.peer, self.handshake_timeout,
                              lambda: self.closing.is_set() or hub.stopping.is_set(),
                              plaintext_hub=hub.tls is None)
        self.agent_id: str | None = None
        self.attached = Attachments(self)  # its volumes and their syncs
        self.requests = RequestTable()    # the hub's requests and their owners
        self.outstanding = p.PeerRequests()  # the agent's requests not answered yet (RP-12)
        self.legal = None                 # after HELLO_REPLY: what the hub takes (check_legal)
        self.frame_sums: DataSums | None = None  # of the data of the frame being handled
        self.pings: dict[int, int] = {}
        self.sessions: dict[int, RecoverySession] = {}  # recovery sessions by id
        self.session_ids = itertools.count(1)
        self.rtt_ns: int | None = None
        self.refusing: str | None = None    # why this stream's records are refused
        self.features = p.Feature.NONE      # granted in HELLO_REPLY
        self.last_heartbeat_ns = 0
        self.connected_ns = time.time_ns()
        self.closing = threading.Event()
        self.acker = Acker(self)
        self.thread: threading.Thread | None = None
        self.state = ConnState.HANDSHAKE

    def set_state(self, new: ConnState) -> None:
        """Move to ``new`` (connection thread); an unexpected move is a bug, said clearly."""
        if new not in CONN_TRANSITIONS[self.state]:
            raise RuntimeError(f"connection {self.peer}: cannot go from {self.state.value} "
                               f"to {new.value}")
        log.debug("connection %s: %s -> %s", self.peer, self.state.value, new.value)
        self.state = new

    # -- plumbing --------------------------------------------------------------

    def send(self, msg: p.Message, payload_crc: int | None = None) -> None:
        """Send one message under the send lock (any thread).  An answer to one
        of the agent's requests frees its request id before it leaves: the
        agent may use the id again once it has the answer (RP-12).
        ``payload_crc``: the payload's CRC-32 if the caller has it."""
        self._sending(msg)
        self.io.send(msg, payload_crc)

    def send_many(self, msgs: list[p.Message]) -> None:
        """``send`` each of ``msgs``, in order, in as few system calls as it can."""
        for msg in msgs:
            self._sending(msg)
        self.io.send_many(msgs)

    def _sending(self, msg: p.Message) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("<-- %s to %s", msg.describe(), self.peer)
        self.outstanding.answering(msg)

    def send_error(self, err: p.ReplicationError) -> None:
        try:
            self.send(p.Error.from_exception(err))
        except (OSError, ConnectionClosed):
            pass

    def say_goodbye(self, reason: str, code: p.GoodbyeCode) -> None:
        """End the connection with GOODBYE (any thread): the replies already queued
        go first, nothing after it (LV-2); then the recv loop ends.  ``code`` goes
        on the wire where GOODBYE_CODE is granted (LV-5); ``reason`` is for humans."""
        self.acker.drain(timeout=10)
        self.io.send_last(p.Goodbye.for_features(self.features, reason, code))
        log.info("connection %s (%s) closed by the hub: %s", self.peer, self.agent_id, reason)
        self.closing.set()
        self.abort(reason)

    def abort(self, reason: str) -> None:
        """Cut the connection now (any thread); the recv loop then ends."""
        if not self.closing.is_set():
            log.warning("closing connection %s (%s): %s", self.peer, self.agent_id, reason)
        self.closing.set()
        self.io.shutdown()

    def recv_frame(self, deadline: float | None = None):
        """Read one frame (``AgentSocket.recv_frame``): (header, message), or None
        when stopping or at EOF.  ``deadline``: the handshake's, before AUTH_OK."""
        item = self.io.recv_frame(deadline, None if deadline is not None else self.legal)
        if item is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("--> %s from %s", item[1].describe(), self.peer)
        return item

    # -- setup / handle / finish -------------------------------------------------

    def run(self) -> None:
        """Connection thread."""
        try:
            try:
                established = self.setup()
            except p.RequestError as err:
                # Any error in the handshake ends the connection, answered (HS-10, HS-12).
                log.warning("handshake from %s refused: %s", self.peer, err)
                self.hub.count_error("handshake")
                self.send_error(err)
                established = False
            if established:
                self.handle()
        except Exception as err:  # noqa: BLE001 - one connection never kills the server
            self.handle_error(err)
        finally:
            self.finish()

    def handle_error(self, err: Exception) -> None:
        if isinstance(err, p.ProtocolError):
            log.warning("protocol error from %s (%s): %s; closing", self.peer,
                        self.agent_id, err)
            self.hub.count_error("protocol")
            self.send_error(err)
            # Nothing follows it, ACKs still queued included: an ACK after a
            # reused id could be taken for the wrong request's.
            self.io.seal()
        elif (isinstance(err, (ConnectionClosed, ConnectionError, socket.timeout, ssl.SSLError))
              or (isinstance(err, OSError) and self.closing.is_set())):
            if not self.closing.is_set():
                log.warning("connection %s (%s) lost: %s", self.peer, self.agent_id, err)
                self.hub.count_error("connection_lost")
        else:
            log.error("connection %s (%s) failed: %r", self.peer, self.agent_id, err,
                      exc_info=err)

    def setup(self) -> bool:
        """The handshake (``Handshake``), then the connection is established:
        AUTH_OK, the frame timeout, the acker, the hub knows it (connection thread)."""
        agent_id = Handshake(self).run()
        if agent_id is None:
            return False
        self.agent_id = agent_id
        self.send(p.AuthOk())
        self.set_state(ConnState.ESTABLISHED)
        self.io.settimeout(FRAME_TIMEOUT)
        self.acker.start()
        self.hub.register(self)
        log.info("agent %s connected from %s%s", self.agent_id, self.peer,
                 " (TLS)" if self.hub.tls else "")
        return True

    def handle(self) -> None:
        """The recv loop: one frame at a time, in stream order (connection thread)."""
        while not self.closing.is_set():
            msg = None
            try:
                item = self.recv_frame()
                if item is None:
                    return
                header, msg, self.frame_sums = item
                # RP-12: an ACK decides what the agent may forget, so it must
                # not be taken for another request's.
                self.outstanding.received(msg)
                handler = HANDLERS[msg.TYPE]     # check_legal let only these through
                if self.refusing is not None and self.store.faults.writable():
                    self.say_goodbye(STORAGE_RECOVERED, p.GoodbyeCode.STORAGE_RECOVERED)
                    return
                if self.refusing is not None and msg.TYPE in REFUSED_WHILE_DEGRADED:
                    raise JournalRefused(
                        f"refused: an earlier record of this connection could not be "
                        f"journaled ({self.refusing}); this and every later record stay "
                        "marked at the agent until the hub's storage recovers")
                handler(self, header, msg)
            except p.RequestError as err:
                if msg is not None:
                    err.request_id = err.request_id or msg.request_id
                    err.msg_type = err.msg_type or msg.TYPE
                if not p.may_answer_with_error(err):
                    # PROTOCOL.md ER-3: no ERROR for these, or two peers could loop.
                    log.warning("ignoring a bad %s from %s (%s): %s",
                                p.MsgType(err.msg_type).name, self.peer, self.agent_id, err)
                    self.hub.count_error("request")
                    continue
                if isinstance(err, JournalRefused):  # logged once, by refuse()
                    log.debug("refused from %s (%s): %s", self.peer, self.agent_id, err)
                    self.hub.count_error("refused")
                else:
                    log.warning("request error from %s (%s): %s", self.peer, self.agent_id, err)
                    self.hub.count_error("request")
                self.send_error(err)
                if msg is None and err.msg_type in SYNC_ANSWERS:
                    # A refused answer to a sync request (the hub's id space): that sync
                    # would wait for it forever.
                    job = self.requests.owner(err.request_id, err.msg_type)
                    if job is not None:
                        self.requests.drop(err.request_id)
                        job.give_up(f"its answer to req={err.request_id} was refused: {err}")
                if isinstance(err, JournalRefused) and self.refusing is None:
                    self.refuse(str(err))

    # -- the hub's storage fails (PROTOCOL.md RP-10) -----------------------------------

    def refuse(self, reason: str) -> None:
        """Recv loop: a record of this stream could not be made part of the
        journal, so no later one may be (stream order, RP-2): refuse them all
        with ERROR(IO_ERROR) until the hub's storage recovers.  The agent keeps
        every refused write marked; its syncs stop (their READ_REPLYs would be
        refused too) and the volumes keep their state.  Once the storage takes
        records again the hub ends the connection with GOODBYE, so that the
        agent attaches again and the plan covers everything it kept marked."""
        self.refusing = reason
        log.error("agent %s: %s; its records are refused from here on, stay marked at the "
                  "agent and are resynced when the hub's storage recovers",
                  self.agent_id, reason)
        for job in list(self.attached.jobs):
            job.give_up(f"the hub's storage is degraded ({reason})")

    def finish(self) -> None:
        """Stop syncs, flush ACKs, detach volumes, close (connection thread)."""
        self.set_state(ConnState.CLOSING)
        for job in list(self.attached.jobs):
            job.stop()
        if self.agent_id is not None and self.acker.is_alive():
            self.acker.drain(timeout=30)
            self.acker.stop()
        if self.hub.stopping.is_set() and not self.closing.is_set() and self.agent_id:
            try:
                self.send(p.Goodbye.for_features(self.features, "hub shutting down",
                                                 p.GoodbyeCode.SHUTDOWN))
            except (OSError, ConnectionClosed):
                pass
        for job in list(self.attached.jobs):
            job.join_if_started(timeout=5)
        for s in list(self.sessions.values()):  # RC-5: a TEST overlay ends with the connection
            self.hub.recovery.close(s)
        self.attached.detach_all()
        self.closing.set()
        self.io.close()
        self.hub.unregister(self)
        self.set_state(ConnState.CLOSED)
        if self.agent_id:
            log.info("agent %s from %s disconnected", self.agent_id, self.peer)

    # -- handlers (connection thread) ---------------------------------------------

    def on_ATTACH(self, header, msg: p.Attach) -> None:
        self.attached.attach(msg)

    def on_DETACH(self, header, msg) -> None:
        vol = self.attached.volume(msg)
        self.attached.detach(vol)
        log.info("volume %s detached by %s", vol.name, self.agent_id)
        self.acker.after(self.store.journal.last_seq, p.Ack(request_id=msg.request_id))

    def on_WRITE(self, header, msg: p.Write) -> None:
        vol = self.attached.volume(msg)
        p.check_range(msg.offset, msg.length, vol.size, "WRITE")
        rec = self.store.append_data(vol, msg.offset, msg.length, msg.data, header.payload_crc,
                                     sums=self.frame_sums)
        self.acker.after(rec.seq, p.Ack(request_id=msg.request_id), vol_acked(vol))

    def on_ZERO(self, header, msg: p.Zero) -> None:
        vol = self.attached.volume(msg)
        p.check_range(msg.offset, msg.length, vol.size, "ZERO")
        rec = self.store.append_data(vol, msg.offset, msg.length, None)
        self.acker.after(rec.seq, p.Ack(request_id=msg.request_id), vol_acked(vol))

    def on_FLUSH(self, header, msg) -> None:
        self.acker.after(self.store.journal.last_seq, p.Ack(request_id=msg.request_id))

    def on_CHECKPOINT(self, header, msg: p.Checkpoint) -> None:
        rec = self.store.append_checkpoint(self.agent_id, msg.name)
        log.info("checkpoint %r of agent %s at seq %d", msg.name, self.agent_id, rec.seq)
        self.acker.after(rec.seq, p.Ack(request_id=msg.request_id))

    def _job_for(self, msg, what: str) -> Requester:
        job = self.requests.owner(msg.request_id, msg.TYPE)
        if job is None:
            raise p.InvalidField(f"{msg.TYPE.name} req={msg.request_id} answers no "
                                 f"outstanding {what}")
        return job

    def on_READ_REPLY(self, header, msg: p.ReadReply) -> None:
        self._job_for(msg, "READ").on_read_reply(header, msg, self.frame_sums)

    def on_DIRTY_MAP(self, header, msg: p.DirtyMap) -> None:
        if msg.request_id == 0 and self.refusing is not None:
            return  # refused writes: the plan at the next ATTACH covers them (RP-10)
        if msg.request_id == 0:  # regions the agent could not stream: resync them
            vol = self.attached.volume(msg)
            for off, n in msg.extents:
                p.check_range(off, n, vol.size, "DIRTY_MAP extent")
            log.info("agent %s reports %d unsent regions of %s; resyncing them",
                     self.agent_id, len(msg.extents), vol.name)
            if msg.extents:
                self.attached.start_sync(vol, p.SyncPlan.DIRTY, list(msg.extents))
            return
        self._job_for(msg, "DIRTY_QUERY").on_reply(msg, self.store.journal.last_seq)

    def on_EXTENTS(self, header, msg: p.Extents) -> None:
        self._job_for(msg, "EXTENT_QUERY").on_extents(msg)

    def on_CHECKSUMS(self, header, msg: p.Checksums) -> None:
        # Every frame received before this one is journaled: compare with that state.
        self._job_for(msg, "CHECKSUM_QUERY").on_reply(msg, self.store.journal.last_seq)

    def on_PING(self, header, msg: p.Ping) -> None:
        self.send(p.Pong(request_id=msg.request_id, echo_ns=msg.sent_ns,
                         responder_ns=time.time_ns()))

    def on_PONG(self, header, msg: p.Pong) -> None:
        sent = self.pings.pop(msg.request_id, None)
        if sent is not None:
            self.rtt_ns = time.monotonic_ns() - sent
            self.last_heartbeat_ns = time.time_ns()

    def on_ACK(self, header, msg: p.Ack) -> None:
        owner = self.requests.owner(msg.request_id, p.MsgType.ACK)
        if owner is None:
            log.warning("agent %s sent an ACK for req=%d, which the hub did not ask: ignored",
                        self.agent_id, msg.request_id)
            return
        owner.on_ack(msg)

    def on_ERROR(self, header, msg: p.Error) -> None:
        job = self.requests.owner(msg.request_id)
        if job is not None:
            job.on_error(msg)
        else:
            log.warning("agent %s reports: %s", self.agent_id, msg.describe())

    def on_GOODBYE(self, header, msg: p.Goodbye) -> None:
        log.info("agent %s says goodbye: %s", self.agent_id, msg.reason)
        self.closing.set()

    # -- recovery sessions (connection thread; PROTOCOL.md "Recovery") -------------

    def _session(self, msg) -> RecoverySession:
        s = self.sessions.get(msg.volume)
        p.check_volume_phase(msg, p.Side.HUB, p.VolumePhase.NONE if s is None
                             else p.VolumePhase.OPEN, f"session id {msg.volume}")
        return s

    def on_RECOVER_OPEN(self, header, msg: p.RecoverOpen) -> None:
        s = self.hub.recovery.open(self, msg.mode, msg.name, msg.point)
        self.send(p.RecoverReady(request_id=msg.request_id, volume=s.id, size=s.vol.size,
                                 point_time_ns=s.time_ns))

    def on_RREAD(self, header, msg: p.RRead) -> None:
        s = self._session(msg)
        p.check_range(msg.offset, msg.length, s.vol.size, "RREAD")
        data, crc = s.read(msg.offset, msg.length)
        if data is None:
            reply = p.RReadReply(request_id=msg.request_id, volume=msg.volume,
                                 offset=msg.offset, length=msg.length, flags=p.FLAG_ZERO)
        else:
            reply = p.RReadReply(request_id=msg.request_id, volume=msg.volume,
                                 offset=msg.offset, length=msg.length, data=data)
        self.send(reply, payload_crc=crc)

    def on_RWRITE(self, header, msg: p.RWrite) -> None:
        s = self._session(msg)
        p.check_range(msg.offset, msg.length, s.vol.size, "RWRITE")
        seq = s.write(msg.offset, msg.length, None if msg.is_zero else msg.data,
                      None if msg.is_zero else header.payload_crc, self.frame_sums)
        self.acker.after(seq, p.Ack(request_id=msg.request_id))  # RC-4: once durable

    def on_RFLUSH(self, header, msg: p.RFlush) -> None:
        self.acker.after(self._session(msg).flush_seq(), p.Ack(request_id=msg.request_id))

    def on_RECOVER_CLOSE(self, header, msg: p.RecoverClose) -> None:
        seq = self.hub.recovery.close(self._session(msg))
        self.acker.after(seq, p.Ack(request_id=msg.request_id))

    # -- sync and liveness (any thread) ------------------------------------------

    def ping(self) -> None:
        """Heartbeat thread: send a PING; on_PONG measures the round trip."""
        req = self.requests.new_id()
        self.pings = {k: v for k, v in self.pings.items()
                      if time.monotonic_ns() - v < 60e9}
        self.pings[req] = time.monotonic_ns()
        self.send(p.Ping(request_id=req, sent_ns=time.time_ns()))

    def status(self) -> dict:
        return dict(agent_id=self.agent_id, address=self.peer, state=self.state.value,
                    connected_since=fmt_time_ns(self.connected_ns),
                    connected_since_ns=self.connected_ns,
                    rtt_ms=None if self.rtt_ns is None else round(self.rtt_ns / 1e6, 3),
                    last_heartbeat=fmt_time_ns(self.last_heartbeat_ns),
                    volumes=sorted(v.name for v in self.attached.volumes.values()))


#: The GOODBYE to a connection whose records were refused, once they can be taken.
STORAGE_RECOVERED = "the hub's storage recovered: attach again to resync the refused writes"
#: What a connection whose stream the journal refused refuses too (RP-10).
REFUSED_WHILE_DEGRADED = frozenset({
    p.MsgType.WRITE, p.MsgType.ZERO, p.MsgType.CHECKPOINT, p.MsgType.READ_REPLY,
    p.MsgType.EXTENTS, p.MsgType.ATTACH})


def owed_plan(vol: Volume) -> p.SyncPlan:
    """The sync a volume still owes: the plan of one that began and did not
    finish (FULL until the first full sync completes), NONE when consistent."""
    if not vol.meta["full_synced"]:
        return p.SyncPlan.FULL
    if vol.state == VolState.CONSISTENT or not vol.meta.get("pending_plan"):
        return p.SyncPlan.NONE
    return p.SyncPlan[vol.meta["pending_plan"]]


def vol_acked(vol: Volume):
    def done():
        vol.last_ack_ns = time.time_ns()
    return done


HANDLERS = {t: getattr(AgentConnection, f"on_{t.name}")
            for t in p.MsgType if hasattr(AgentConnection, f"on_{t.name}")}


class Handshake:
    """The hub's side of one connection's handshake (PROTOCOL.md "Handshake
    phase"): TLS if the hub has it, then HELLO / HELLO_REPLY / AUTH, all
    within the handshake timeout from its start (HANDSHAKE_TIMEOUT,
    ``--handshake-timeout``).  On the way it grants the features (VN-3) and
    sets what the connection takes from then on (``legal``).

    Threads::

        run                        conn-HOST:PORT (AgentConnection.setup)
    """

    def __init__(self, conn: AgentConnection):
        self.conn = conn

    def run(self) -> str | None:
        """The agent's id once it proved it (connection thread), or None: it went
        away, or was refused and answered (HS-10, HS-12; raises RequestError for
        the connection to answer)."""
        conn = self.conn
        deadline = time.monotonic() + conn.handshake_timeout
        conn.io.settimeout(conn.handshake_timeout)
        if conn.hub.tls is not None and not conn.io.start_tls(conn.hub.tls, deadline):
            return None
        hello = self._expect(deadline, p.Hello)
        if hello is None:
            return None
        if not hello.min_version <= p.VERSION <= hello.max_version:
            raise_and_close = p.RequestError(
                f"no common protocol version: agent offers {hello.min_version}.."
                f"{hello.max_version}, hub speaks {p.SUPPORTED_VERSIONS}",
                code=p.ErrorCode.VERSION, msg_type=p.MsgType.HELLO)
            log.warning("%s: %s", conn.peer, raise_and_close)
            conn.hub.count_error("handshake")
            conn.send_error(raise_and_close)
            return None
        secret = conn.hub.agents.get(hello.agent_id)
        known = secret is not None
        if not known:  # answer anyway: never reveal which ids exist
            secret = secrets.token_bytes(32)
        nonce = secrets.token_bytes(p.NONCE_SIZE)
        hub_id = conn.store.hub_id
        # VN-3: grant what was offered and is implemented; unknown bits are ignored.
        conn.features = p.Feature(hello.features & HUB_FEATURES)
        conn.legal = p.legality(p.Side.HUB, conn.features)
        conn.send(p.HelloReply(version=p.VERSION, features=conn.features, nonce=nonce,
                               hub_id=hub_id,
                               proof=p.hub_proof(secret, hello.nonce, nonce,
                                                 hello.agent_id, hub_id)))
        auth = self._expect(deadline, p.Auth)
        if auth is None:
            return None
        expected = p.agent_proof(secret, hello.nonce, nonce, hello.agent_id, hub_id)
        if not (known and p.proof_matches(expected, auth.proof)):
            log.warning("authentication failed from %s: %s", conn.peer,
                        "unknown agent id %r" % hello.agent_id if not known
                        else f"wrong proof for agent {hello.agent_id!r}")
            conn.hub.count_error("auth")
            conn.send_error(p.RequestError("authentication failed",
                                           code=p.ErrorCode.AUTH_FAILED,
                                           msg_type=p.MsgType.AUTH))
            return None
        return hello.agent_id

    def _expect(self, deadline: float, cls):
        """During the handshake: the next message if it is ``cls``; else None,
        once the peer is answered (or gone, or silent past ``deadline``)."""
        conn = self.conn
        item = conn.recv_frame(deadline)
        if item is None:
            return None
        _, msg, _ = item
        if isinstance(msg, cls):
            return msg
        if isinstance(msg, (p.Goodbye, p.Error)):
            log.warning("%s ended the handshake: %s", conn.peer, msg.describe())
            return None
        err = p.RequestError(f"{msg.TYPE.name} is not allowed before AUTH_OK "
                             f"(expected {cls.TYPE.name})", code=p.ErrorCode.BAD_PHASE,
                             request_id=msg.request_id, msg_type=msg.TYPE)
        log.warning("%s: %s; closing", conn.peer, err)
        conn.hub.count_error("handshake")
        conn.send_error(err)
        return None


class Attachments:
    """The volumes attached on one agent connection, and their syncs
    (PROTOCOL.md "Volumes", "Volume phases", "Sync plans").

    ``attach`` answers an ATTACH: it chooses the plan (SY-1; VERIFY when two
    live connections had the volume, VO-7; another disk refused, VO-8), takes
    the volume over from another connection of the agent, or attaches a
    promoted volume DEMOTED (FB-1).  ``volume`` finds the volume a message
    names, if its phase here takes that message; ``start_sync`` starts or
    extends the volume's SyncJob; ``detach`` and ``detach_all`` let go.

    Threads::

        attach, volume, phase      conn-HOST:PORT (the recv loop)
        other_disk                 conn-HOST:PORT (ATTACH)
        take_over, attach_demoted  conn-HOST:PORT (ATTACH), under Volume.attach_lock
        start_sync                 conn-HOST:PORT (ATTACH, DIRTY_MAP), or any thread that found
                                   rot in the replica (scrub, control-N, sync-VOLUME)
        detach                     conn-HOST:PORT (DETACH, ATTACH elsewhere)
        detach_all                 conn-HOST:PORT, at its end
    """

    def __init__(self, conn: AgentConnection):
        self.conn = conn
        self.store = conn.store
        self.volumes: dict[int, Volume] = {}
        self.demoted: dict[int, p.Attach] = {}  # volume id -> its DEMOTED ATTACH
        self.refused_identity: set[str] = set()  # volumes refused for their disk (VO-8)
        self.sync_lock = threading.Lock()        # the jobs, and a job's extra extents
        self.jobs: set[SyncJob] = set()

    def volume(self, msg) -> Volume:
        """The attached volume ``msg`` names, if its phase here takes ``msg``
        (PROTOCOL.md "Volume phases"): else NO_SUCH_VOLUME, or ROLE for a write
        to a promoted volume (RC-7), attached DEMOTED included (FB-2)."""
        vol = self.volumes.get(msg.volume)
        p.check_volume_phase(msg, p.Side.HUB, self.phase(vol),
                             f"volume id {msg.volume}" if vol is None else f"volume {vol.name}")
        return vol

    def phase(self, vol: Volume | None) -> p.VolumePhase:
        """What ``vol``, attached here (None: not), is on this connection."""
        if vol is None:
            return p.VolumePhase.NONE
        if vol.id in self.demoted:
            fb = vol.failback
            begun = fb is not None and fb.conn is self.conn and fb.begun
            return p.VolumePhase.FAILING_BACK if begun else p.VolumePhase.DEMOTED
        return p.VolumePhase.PROMOTED if vol.role is Role.PROMOTED else p.VolumePhase.PROTECTED

    def attach(self, msg: p.Attach) -> None:
        """Answer an ATTACH (connection thread): choose the plan, attach, start its sync."""
        again = next((v for v in self.volumes.values() if v.name == msg.name), None)
        if again is not None:   # VO-9: the attachment, and its sync, go on unchanged
            raise p.RequestError(f"volume {msg.name!r} is already attached on this "
                                 f"connection as id {again.id}: DETACH it first",
                                 code=p.ErrorCode.BUSY)
        vol, created = self.store.open_or_create(msg.name, msg.size, msg.chunk_size,
                                                 self.conn.agent_id, msg.generation)
        if created:
            plan = p.SyncPlan.FULL
        else:
            if vol.owner != self.conn.agent_id:
                raise p.RequestError(f"volume {msg.name!r} belongs to another agent",
                                     code=p.ErrorCode.NOT_OWNER)
            if vol.size != msg.size:
                raise p.InvalidField(f"ATTACH size {msg.size} differs from volume "
                                     f"{msg.name!r}'s size {vol.size}")
            if vol.role is Role.PROMOTED:
                if not self.conn.features & p.Feature.FAILBACK:  # FB-1, RC-7
                    raise p.RequestError(f"volume {msg.name!r} was promoted",
                                         code=p.ErrorCode.ROLE)
                self.attach_demoted(vol, msg)
                return
            same_gen = vol.meta["generation"] == bytes(msg.generation).hex()
            if not same_gen and not vol.meta.get("reseed"):
                self.refused_identity.add(vol.name)
                raise p.RequestError(self.other_disk(vol, msg), code=p.ErrorCode.NOT_OWNER)
            if not vol.meta["full_synced"]:
                plan = p.SyncPlan.FULL
            elif (vol.meta.get("pending_plan") == "VERIFY" or not same_gen
                  or msg.state == p.VolumeState.UNKNOWN):
                plan = p.SyncPlan.VERIFY
            elif msg.state == p.VolumeState.CLEAN:
                plan = p.SyncPlan.NONE
            else:
                plan = p.SyncPlan.DIRTY
            plan = max(plan, owed_plan(vol))   # a sync that did not finish is redone (SY-1)
        with vol.attach_lock:   # one connection at a time has the volume (VO-7)
            if self.take_over(vol) and plan < p.SyncPlan.VERIFY:
                plan = p.SyncPlan.VERIFY   # two live hosts, one agent id: trust no bitmap
            vol.update(generation=bytes(msg.generation).hex(), chunk_size=msg.chunk_size,
                       reseed=False)
            if plan == p.SyncPlan.NONE and vol.state != VolState.CONSISTENT:
                vol.update(state=VolState.CONSISTENT.value, pending_plan=None)
            self.volumes[vol.id] = vol
            vol.attached_to = self.conn
            log.info("volume %s attached by %s (agent state %s): plan %s", vol.name,
                     self.conn.agent_id, msg.state.name, plan.name)
            job = self.start_sync(vol, plan, start=False) if plan != p.SyncPlan.NONE else None
        self.conn.send(p.Attached(request_id=msg.request_id, volume=vol.id, plan=plan))
        if job is not None:
            job.start()  # its READs follow ATTACHED on the wire

    def other_disk(self, vol: Volume, msg: p.Attach) -> str:
        """Why an ATTACH with another generation than the volume's is refused
        (VO-8): it names another disk, or this disk with its agent state lost;
        only the operator can tell, and ``rephub.py reseed`` says which."""
        known, offered = vol.meta["generation"][:8], bytes(msg.generation).hex()[:8]
        where = (f"; the volume is attached from {vol.attached_to.peer}"
                 if vol.attached_to is not None and not vol.attached_to.closing.is_set() else "")
        log.warning("volume %s: agent %s from %s offers disk identity %s, the hub knows %s%s: "
                    "refused (rephub.py reseed %s accepts it)", vol.name, self.conn.agent_id,
                    self.conn.peer, offered, known, where, vol.name)
        return (f"volume {vol.name!r} is bound to another disk (identity {known}..., this "
                f"agent's is {offered}...{where}): a cloned host or a copied configuration? "
                f"If this disk replaces it, or this agent lost its state directory, run "
                f"`rephub.py reseed {vol.name}` on the hub")

    def attach_demoted(self, vol: Volume, msg: p.Attach) -> None:
        """ATTACHED(plan DEMOTED) for a promoted volume, to an agent that offered
        FAILBACK (FB-1): no sync, its writes refused (FB-2), but ``rephub.py
        failback`` may bring the volume home through it.  The ATTACH's state and
        generation say whether its dirty map can be trusted then."""
        with vol.attach_lock:
            self.take_over(vol)
            self.volumes[vol.id] = vol
            self.demoted[vol.id] = msg
            vol.attached_to = self.conn
        log.warning("volume %s attached DEMOTED by %s (agent state %s): it was promoted at "
                    "the recovery site; its writes are refused until rephub.py failback "
                    "brings it back", vol.name, self.conn.agent_id, msg.state.name)
        self.conn.send(p.Attached(request_id=msg.request_id, volume=vol.id,
                                  plan=p.SyncPlan.DEMOTED))

    def take_over(self, vol: Volume) -> bool:
        """Under ``vol.attach_lock``, before attaching ``vol`` here: detach it from
        the connection that has it (its sync stops and can no longer end, its
        answers are dropped); that connection ends if nothing is left on it.
        True if it was alive: an agent restarted while its old connection
        lingers, or two hosts run with one agent id."""
        old = vol.attached_to
        if old is None or old is self.conn:
            return False
        alive = not old.closing.is_set()
        if alive:
            log.warning("volume %s: attached by agent %s from %s while its connection from %s "
                        "still has it (a restarted agent, or two hosts with one agent id?): "
                        "that attachment ends and the volume is verified", vol.name,
                        self.conn.agent_id, self.conn.peer, old.peer)
        old.attached.detach(vol, join=False)
        if alive and not old.attached.volumes and not old.sessions:
            old.abort(f"volume {vol.name} was attached by another connection of agent "
                      f"{self.conn.agent_id} from {self.conn.peer}")
        return alive

    def detach(self, vol: Volume, join: bool = True) -> None:
        """Forget ``vol`` on this connection and stop its sync (any thread)."""
        with self.sync_lock:
            job = vol.sync if vol.sync is not None and vol.sync.conn is self.conn else None
        if job is not None:
            job.stop()
            if join:
                job.join_if_started(timeout=5)
        self.volumes.pop(vol.id, None)
        self.demoted.pop(vol.id, None)
        if vol.attached_to is self.conn:
            vol.attached_to = None

    def start_sync(self, vol: Volume, plan: p.SyncPlan, extents=None,
                   start: bool = True) -> SyncJob | None:
        """Start a sync job for ``vol`` (its state is persisted first), or add
        ``extents`` to the one running; return the new job, else None.

        A new job covers at least what an earlier one that did not finish owed
        (SY-1): a DIRTY job for a few reported ``extents`` becomes that plan in
        full (the agent still has those extents marked, so the plan covers them)."""
        with vol.attach_lock, self.sync_lock:
            job = vol.sync
            if job is not None and job.conn is self.conn and job.add_extents(extents):
                return None
            owed = owed_plan(vol)
            if owed > plan or (owed == plan and extents is not None):
                log.info("volume %s: an earlier %s sync did not finish; redoing it in full",
                         vol.name, owed.name)
                plan, extents = owed, None
            job = SyncJob(self.conn, vol, plan, extents)
            vol.sync = job
            self.jobs.add(job)
            job.begin()
        if start:
            job.start()
        return job

    def detach_all(self) -> None:
        """The connection ends: none of its volumes is attached anywhere now."""
        for vol in self.volumes.values():
            if vol.attached_to is self.conn:
                vol.attached_to = None
        self.volumes.clear()


class RequestTable:
    """The hub's requests outstanding on one connection, by id: their owners
    and the type of answer each waits for.

    Owners add and drop their own from their threads (sync jobs, fail-back);
    the connection thread looks answers up.  Ids come from the same table, so
    none is reused while the connection lives (RP-7).

    Threads::

        new_id, add, drop_all      sync-VOLUME or control-N (the owner); takes the table's lock
        owner, drop                conn-HOST:PORT (the recv loop), or the owner; takes the lock
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._owners: dict[int, tuple[Requester, p.MsgType]] = {}

    def new_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def add(self, request: p.Message, owner: Requester) -> None:
        """Before ``request`` is sent: its answer may come at once."""
        with self._lock:
            self._owners[request.request_id] = (owner, p.ANSWERED_BY[request.TYPE])

    def owner(self, req: int, answer: p.MsgType | None = None) -> Requester | None:
        """The owner of request ``req`` if it is outstanding and, when ``answer``
        is given, a request that this type of message answers (ER-7: a
        CHECKSUMS carrying a READ's id answers nothing)."""
        with self._lock:
            owner, waits_for = self._owners.get(req, (None, None))
        return owner if answer is None or answer == waits_for else None

    def drop(self, req: int) -> Requester | None:
        with self._lock:
            return self._owners.pop(req, (None, None))[0]

    def drop_all(self, reqs) -> None:
        with self._lock:
            for req in reqs:
                self._owners.pop(req, None)


class Requester:
    """What owns requests the hub sends an agent (a SyncJob, a Failback).

    The connection thread hands each answer to the owner of its request id
    in the connection's ``RequestTable``.  An owner overrides the answers its
    requests get; any other kind names no request of its type (ER-7), so the
    defaults refuse it, and an unasked ACK is dropped (ER-3).

    Threads::

        *                          conn-HOST:PORT: the recv loop hands each answer to its owner
    """

    def on_read_reply(self, header, msg: p.ReadReply, sums: DataSums | None = None) -> None:
        raise p.InvalidField(f"READ_REPLY req={msg.request_id} answers no outstanding READ")

    def on_reply(self, msg, barrier_seq: int) -> None:
        raise p.InvalidField(f"{msg.TYPE.name} req={msg.request_id} answers no outstanding "
                             "query of its type")

    def on_extents(self, msg: p.Extents) -> None:
        raise p.InvalidField(f"EXTENTS req={msg.request_id} answers no outstanding "
                             "EXTENT_QUERY")

    def on_ack(self, msg: p.Ack) -> None:
        log.warning("ACK for req=%d, which asked for no ACK: ignored", msg.request_id)

    def on_error(self, msg: p.Error) -> None:
        raise NotImplementedError

    def give_up(self, why: str) -> None:
        """The hub refused the agent's answer to one of our requests (``why``)."""
        raise NotImplementedError


#: The fields of its request an answer repeats unchanged (PROTOCOL.md SY-5;
#: CHECKSUMS' chunk_size too): an answer that changes one is refused (ER-7).
ECHOED_FIELDS = {
    p.MsgType.READ_REPLY: ("volume", "offset", "length"),
    p.MsgType.EXTENTS: ("volume", "offset", "length"),
    p.MsgType.CHECKSUMS: ("volume", "offset", "length", "chunk_size"),
    p.MsgType.DIRTY_MAP: ("volume",),
}


@dataclasses.dataclass(frozen=True)
class Asked:
    """What an answer must repeat of its request (``ECHOED_FIELDS``)."""

    volume: int
    offset: int
    length: int
    chunk_size: int


class RequestWindow:
    """The requests one owner (a ``Requester``) has out to the agent of one
    volume: what each asked for until it is answered, the answers its thread
    has not taken yet, and the Condition both are guarded by.

    The owner's thread ``ask``s (the request goes into the connection's
    ``RequestTable`` before it is sent: its answer may come at once) and
    ``take``s answers; the recv loop ``check``s each answer against its
    request, then either ``hand_over``s it or, having acted on it itself,
    says it is ``done``.  An owner may share its own Condition with the
    window, so that one notify wakes every wait, and may say how ``done``
    wakes it (``wake``, called with the Condition held; by default every
    waiter is woken).

    Threads::

        ask, ask_many, take         the owner's thread: sync-VOLUME or control-N
        wait_for, close             the owner's thread: sync-VOLUME or control-N
        check, done, hand_over      conn-HOST:PORT (the recv loop)
        hand_over_all               conn-HOST:PORT (an answer was refused: ``give_up``)
    """

    def __init__(self, conn: AgentConnection, owner: Requester, vol: Volume,
                 cond: threading.Condition | None = None,
                 wake: Callable[[], None] | None = None):
        self.conn = conn
        self.owner = owner
        self.vol = vol
        self.cond = cond or threading.Condition()
        self.wake = wake or self.cond.notify_all
        self.asked: dict[int, Asked] = {}       # req -> what it asked, until answered
        self.asked_bytes = 0                    # the lengths of ``asked``, summed
        self.answers: dict[int, tuple] = {}     # req -> (answer, context), until taken

    def ask(self, request: p.Message, payload_crc: int | None = None) -> int:
        """Register ``request`` as ours and send it (``payload_crc``: as
        ``AgentConnection.send``'s); return its id."""
        self._register(request)
        self.conn.send(request, payload_crc)
        return request.request_id

    def ask_many(self, requests: list[p.Message]) -> None:
        """``ask`` each of ``requests``, in one send (``AgentConnection.send_many``)."""
        for request in requests:
            self._register(request)
        self.conn.send_many(requests)

    def _register(self, request: p.Message) -> None:
        with self.cond:
            self.asked[request.request_id] = Asked(request.volume, request.offset, request.length,
                                                   getattr(request, "chunk_size", 0))
            self.asked_bytes += request.length
        self.conn.requests.add(request, self.owner)

    def check(self, msg: p.Message) -> None:
        """Raise InvalidField, naming the field, if the answer ``msg`` changes
        one of its request's (SY-5), or OutOfRange for a DIRTY_MAP extent
        past the volume's end.  The type was checked by ``RequestTable.owner``."""
        with self.cond:
            asked = self.asked.get(msg.request_id)
        what = f"{msg.TYPE.name} req={msg.request_id}"
        if asked is None:
            raise p.InvalidField(f"{what} answers no outstanding request")
        for name in ECHOED_FIELDS.get(msg.TYPE, ()):
            got, want = getattr(msg, name), getattr(asked, name)
            if got != want:
                raise p.InvalidField(f"{what} has {name}={got}, expected {want} (the request's)")
        if isinstance(msg, p.DirtyMap):
            for off, n in msg.extents:
                p.check_range(off, n, self.vol.size, "DIRTY_MAP extent")

    def done(self, req: int) -> None:
        """Request ``req`` is answered, and the answer dealt with."""
        with self.cond:
            self._answered(req)
            self.wake()
        self.conn.requests.drop(req)

    def _answered(self, req: int) -> None:
        """``req`` is no longer outstanding (the Condition held)."""
        asked = self.asked.pop(req, None)
        if asked is not None:
            self.asked_bytes -= asked.length

    def hand_over(self, req: int, answer, context=None) -> None:
        """Request ``req`` is answered: keep ``answer`` (a message, or the text
        of why the hub refused it) and ``context`` for the owner's thread."""
        with self.cond:
            self._answered(req)
            self.answers[req] = (answer, context)
            self.cond.notify_all()
        self.conn.requests.drop(req)

    def hand_over_all(self, why: str) -> None:
        """No outstanding request will be answered now: each gets ``why``."""
        with self.cond:
            asked = list(self.asked)
        for req in asked:
            self.hand_over(req, why)

    def wait_for(self, ready, check, deadline: float | None = None):
        """Wait until ``ready()`` (called with the Condition held) returns
        something true, and return that; ``check()`` runs between waits and
        raises to stop waiting.  None once ``deadline`` (monotonic) passes."""
        with self.cond:
            while not (got := ready()):
                check()
                left = POLL_INTERVAL if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, POLL_INTERVAL))
            return got

    def take(self, reqs, check, deadline: float | None = None):
        """The first handed-over answer to one of ``reqs``, as (req, answer,
        context), or None at ``deadline``; ``check`` as for ``wait_for``."""
        def first():
            for req in reqs:
                if req in self.answers:
                    return (req, *self.answers.pop(req))
            return None
        return self.wait_for(first, check, deadline)

    def close(self) -> None:
        """The owner is done: none of its ids is outstanding any more."""
        with self.cond:
            reqs = list(self.asked)
            self.asked.clear()
            self.asked_bytes = 0
            self.answers.clear()
        self.conn.requests.drop_all(reqs)


def pipelined(ranges: collections.deque, limit: int, ask, take):
    """Requests for ``ranges`` with at most ``limit`` unanswered: ``ask(offset,
    length)`` sends the one for a range and returns its id, ``take(ids)`` waits
    for the answer to one of them, as (id, answer, context).  Yields (range,
    answer, context) as the answers come; the caller may add to ``ranges``
    meanwhile (the rest of a range an answer covered only in part)."""
    outstanding: dict[int, tuple[int, int]] = {}
    while ranges or outstanding:
        while ranges and len(outstanding) < limit:
            rng = ranges.popleft()
            outstanding[ask(*rng)] = rng
        req, answer, context = take(list(outstanding))
        yield outstanding.pop(req), answer, context


class Acker(threading.Thread):
    """Per connection: sends each reply once the journal is durable past its seq.

    Replies queued with ``after`` leave in the order they were queued (the
    recv loop queues them in stream order), so ACKs follow stream order.

    Threads::

        after                      conn-HOST:PORT (the recv loop), or sync-VOLUME (what a verify
                                   found equal); takes cond
        run                        acker-HOST:PORT
        drain                      conn-HOST:PORT at its end, or any thread saying GOODBYE
        stop                       conn-HOST:PORT, at its end
    """

    def __init__(self, conn: AgentConnection):
        super().__init__(name=f"acker-{conn.peer}", daemon=True)
        self.conn = conn
        self.journal = conn.hub.store.journal
        self.items: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.stop_event = threading.Event()

    def after(self, seq: int, msg: p.Message | None, callback=None) -> None:
        """Queue ``msg`` (and/or ``callback``) for when ``seq`` is durable (recv loop)."""
        with self.cond:
            self.items.append((seq, msg, callback))
            self.cond.notify_all()

    def run(self) -> None:
        """Acker thread."""
        try:
            while True:
                with self.cond:
                    while not self.items and not self.stop_event.is_set():
                        self.cond.wait(0.5)
                    if not self.items:
                        return
                    seq = self.items[0][0]
                if not self.journal.wait_durable(seq, timeout=0.5):
                    if self.journal.failed:
                        self.conn.abort("journal failed: cannot make writes durable")
                        return
                    continue
                durable = self.journal.durable_seq
                with self.cond:
                    ready = []
                    while self.items and self.items[0][0] <= durable:
                        ready.append(self.items.popleft())
                    self.cond.notify_all()
                # What one commit made durable leaves in one go (group commit's
                # ACKs: one system call, not one each).
                msgs = [msg for _, msg, _ in ready if msg is not None]
                if msgs:
                    self.conn.send_many(msgs)
                for _, _, callback in ready:
                    if callback is not None:
                        callback()
        except (OSError, ConnectionClosed) as err:
            log.debug("acker for %s stops: %s", self.conn.peer, err)
            self.conn.abort(f"send failed: {err}")

    def drain(self, timeout: float) -> bool:
        """Wait until every queued reply was sent (stopping thread)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.items and self.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(min(remaining, 0.2))
        return not self.items

    def stop(self) -> None:
        self.stop_event.set()
        with self.cond:
            self.cond.notify_all()
        self.join(timeout=5)


class AgentSocket:
    """The socket of one agent connection: frames in, frames out, and its end.

    Only the connection thread reads (``recv_frame``), one whole frame at a
    time (after the handshake through a ``protocol.FrameReader``, so a burst
    of small frames costs one recv); any thread sends (``send``, under
    ``send_lock``) until the stream is sealed (a GOODBYE or a protocol
    error's ERROR went last: LV-2, ER-1) or closed.  Before AUTH_OK every
    read waits at most for what is left of the handshake's deadline, so a
    peer trickling bytes is cut off in time, and a payload over
    MAX_HANDSHAKE_PAYLOAD is refused unread [SE-3].

    Threads::

        recv_frame, start_tls      conn-HOST:PORT
        settimeout, close          conn-HOST:PORT, at set-up and at the end
        send, send_last, seal      any thread; takes send_lock
        send_many                  any thread (the acker); takes send_lock
        shutdown                   any thread (it ends the recv loop)
    """

    def __init__(self, sock: socket.socket, peer: str, handshake_timeout: float,
                 stopped: Callable[[], bool], plaintext_hub: bool):
        self.sock: socket.socket | TLSStream | None = sock
        self.peer = peer
        self.handshake_timeout = handshake_timeout
        self.stopped = stopped                # the connection or the hub is stopping
        self.plaintext_hub = plaintext_hub    # a TLS ClientHello is then a misconfiguration
        self.send_lock = threading.Lock()
        self.sealed = False
        self.header_buf = bytearray(p.HEADER_SIZE)
        self.last_recv = time.monotonic()     # when the last frame header arrived
        self.reader: p.FrameReader | None = None   # from the first frame after the handshake

    # -- sending (any thread) ---------------------------------------------------

    def send(self, msg: p.Message, payload_crc: int | None = None) -> None:
        with self.send_lock:
            if self.sock is None or self.sealed:
                raise ConnectionClosed("connection closed")
            p.send_message(self.sock, msg, payload_crc)

    def send_many(self, msgs: list[p.Message]) -> None:
        with self.send_lock:
            if self.sock is None or self.sealed:
                raise ConnectionClosed("connection closed")
            p.send_messages(self.sock, msgs)

    def send_last(self, msg: p.Message) -> None:
        """Send ``msg`` if the stream is still open, then seal it: nothing follows."""
        with self.send_lock:
            if self.sock is not None and not self.sealed:
                try:
                    p.send_message(self.sock, msg)
                except OSError as err:
                    log.debug("%s to %s not sent: %s", msg.TYPE.name, self.peer, err)
            self.sealed = True

    def seal(self) -> None:
        """Nothing more is sent, replies already queued included."""
        with self.send_lock:
            self.sealed = True

    def shutdown(self) -> None:
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        with self.send_lock:
            sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def settimeout(self, timeout: float) -> None:
        self.sock.settimeout(timeout)

    # -- receiving (connection thread) -----------------------------------------------

    def start_tls(self, context: ssl.SSLContext, deadline: float) -> bool:
        """The TLS handshake, within ``deadline``; False if stopping before it began.
        A plaintext agent (its first bytes are RPL1) gets a plaintext refusal."""
        if not self._wait_readable(deadline):
            return False
        if self.sock.recv(1, socket.MSG_PEEK) == MAGIC_BYTES[:1]:
            self._refuse_plaintext_agent(deadline)
        # The socket's timeout bounds the whole TLS handshake (CPython
        # counts it from the start of do_handshake), so set what is left.
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            tls = context.wrap_socket(self.sock, server_side=True)
        except socket.timeout as err:
            raise self._handshake_late() from err
        self.sock = TLSStream(tls, self.handshake_timeout)
        return True

    def _refuse_plaintext_agent(self, deadline: float) -> None:
        """A TLS hub's new connection starts with RPL1: an agent without TLS.  Read
        its HELLO (so closing does not reset the connection before the agent
        reads the answer) and refuse it in plaintext, which that agent can read."""
        try:
            self.recv_frame(deadline)
        except p.ReplicationError:
            pass
        raise p.ProtocolError("the hub expects TLS: use --tls-ca on the agent (a plaintext "
                              "agent connected to a TLS hub)")

    def _wait_readable(self, deadline: float | None) -> bool:
        """Between frames: wait for data, watching the stop flags (connection thread)."""
        while True:
            if self.stopped():
                return False
            if (self.reader is not None and self.reader.buffered()) or (
                    isinstance(self.sock, TLSStream) and self.sock.pending()):
                return True
            wait = POLL_INTERVAL
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise self._handshake_late()
            ready, _, _ = select.select([self.sock], [], [], wait)
            if ready:
                return True

    def _handshake_late(self) -> ConnectionClosed:
        return ConnectionClosed(f"handshake not done within {self.handshake_timeout:g} s")

    def _read_into(self, view: memoryview, deadline: float | None = None) -> int:
        """Fill ``view``; short only at EOF.  With a ``deadline`` (the handshake)
        every recv waits only for what is left of it, so a peer trickling a
        frame byte by byte is cut off at the deadline too."""
        got = 0
        while got < len(view):
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._handshake_late()
                self.sock.settimeout(left)
            try:
                n = self.sock.recv_into(view[got:])
            except socket.timeout as err:
                if deadline is None:
                    raise
                raise self._handshake_late() from err
            if n == 0:
                break
            got += n
        return got

    def recv_frame(self, deadline: float | None = None, legal=None):
        """Read one frame; return (header, message, sums) or None when stopping or
        at EOF.  ``sums``: the DataSums of a WRITE, READ_REPLY or RWRITE that
        covers a whole CHECK_CHUNK, else None.

        Raises ProtocolError (close) or RequestError (answer, go on) as
        ``protocol.decode_body``, whose ``legal`` it is; once a frame has
        started it is read to its end.  Before AUTH_OK (``deadline`` set: the
        handshake's) a payload over MAX_HANDSHAKE_PAYLOAD is refused before it
        is read or allocated [SE-3].
        """
        if not self._wait_readable(deadline):
            return None
        # The handshake reads no byte past its frames: the TLS handshake may
        # follow the plaintext probe, and a refusal must not have read ahead.
        if deadline is None:
            if self.reader is None:
                self.reader = p.FrameReader(self.sock)
            read = self.reader.read_into
        else:
            read = functools.partial(self._read_into, deadline=deadline)
        got = read(memoryview(self.header_buf))
        if got == 0:
            return None
        if got < p.HEADER_SIZE:
            raise p.TruncatedFrame(f"connection closed inside a frame header "
                                   f"({got} of {p.HEADER_SIZE} bytes)")
        self.last_recv = time.monotonic()
        handshake = deadline is not None
        if handshake and self.plaintext_hub and p.looks_like_tls(self.header_buf):
            raise p.BadMagic("a TLS client connected to a plaintext hub (start the hub with "
                             "--tls-cert/--tls-key, or drop --tls-ca on the agent)")
        header = p.parse_header(self.header_buf)
        if handshake:
            p.check_handshake_header(header)
        payload = bytearray(header.payload_length)
        got = read(memoryview(payload))
        if got < header.payload_length:
            raise p.TruncatedFrame(f"connection closed inside a payload ({got} of "
                                   f"{header.payload_length} bytes)")
        crc = sums = None
        if header.type in SUMMED_FRAMES and header.payload_length >= CHECK_CHUNK:
            crc, sums = DataSums.of_frame(header.offset, payload)
        return header, p.decode_body(header, payload, legal, crc), sums


class TLSStream:
    """A TLS connection shared by a reader and senders, one OpenSSL call at a time.

    OpenSSL forbids SSL_read and SSL_write on one connection from two threads
    at once (CPython's SSLSocket does not serialise them either).  The socket
    is made non-blocking; each call holds ``lock`` only for the call itself and
    waits for readiness with select outside it, so the recv loop waiting for
    the next frame never stalls the acker's sends.  Offers the few socket
    methods the hub and ``protocol.send_message``/``recv_message`` use.

    Threads::

        recv_into, pending   conn-HOST:PORT (the recv loop), under lock for the call
        settimeout, close    conn-HOST:PORT, at set-up and at the end
        shutdown             any thread (heartbeat, main: it ends the recv loop)
        *                    any thread that sends (conn-HOST:PORT, acker-HOST:PORT, heartbeat,
                             sync-VOLUME, control-N), under lock for the call
    """

    def __init__(self, sock: ssl.SSLSocket, timeout: float):
        sock.setblocking(False)
        self.sock = sock
        self.lock = threading.Lock()
        self.timeout = timeout

    def fileno(self) -> int:
        return self.sock.fileno()

    def pending(self) -> int:
        with self.lock:
            return self.sock.pending()

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = FRAME_TIMEOUT if timeout is None else timeout

    def _wait(self, want: str, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout(f"TLS peer made no progress for {self.timeout:.0f} s")
        fd = [self.sock.fileno()]
        try:
            select.select(fd if want == "r" else [], fd if want == "w" else [], [],
                          min(remaining, POLL_INTERVAL))
        except ValueError as err:   # fd -1: closed by another thread (stop, abort)
            raise OSError(errno.EBADF, "TLS connection closed") from err

    def recv_into(self, view) -> int:
        deadline = time.monotonic() + self.timeout
        while True:
            with self.lock:
                try:
                    return self.sock.recv_into(view)
                except ssl.SSLWantReadError:
                    want = "r"
                except ssl.SSLWantWriteError:
                    want = "w"
                except ssl.SSLZeroReturnError:
                    return 0
            self._wait(want, deadline)

    def sendall(self, data) -> None:
        view = memoryview(data).cast("B")
        deadline = time.monotonic() + self.timeout
        while len(view):
            with self.lock:
                try:
                    n = self.sock.send(view)
                    view = view[n:]
                    deadline = time.monotonic() + self.timeout
                    continue
                except ssl.SSLWantWriteError:
                    want = "w"
                except ssl.SSLWantReadError:
                    want = "r"
            self._wait(want, deadline)

    def sendmsg(self, parts):
        raise NotImplementedError("TLS: send_message falls back to sendall")

    def shutdown(self, how: int) -> None:
        socket.socket.shutdown(self.sock, how)  # the TCP socket; never touch the SSL object

    def close(self) -> None:
        self.sock.close()


class RateLimiter:
    """Token bucket shared by every sync (``--sync-rate`` bytes/s; 0 = unlimited).

    Threads::

        acquire              sync-VOLUME and scrub; takes lock
    """

    def __init__(self, rate: float):
        self.rate = rate
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def acquire(self, n: int, stop: threading.Event) -> None:
        if self.rate <= 0:
            return
        with self.lock:
            now = time.monotonic()
            start = max(self.next_free, now)
            self.next_free = start + n / self.rate
        if start > now:
            stop.wait(start - now)


# ---------------------------------------------------------------------------
# Agents file


def check_secret_file_mode(path: str, st: os.stat_result) -> None:
    """Refuse a file of secrets that group or others may access (as ssh does for keys)."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise StoreError(f"agents file {path} has mode {mode:04o}: it holds agent secrets, "
                         "so it must not be accessible by group or others "
                         f"(fix: chmod 600 {path})")


def load_agents(path: str) -> dict[str, bytes]:
    """``AGENT_ID SECRET_HEX [recover=OWNER,...]`` per line; '#' starts a comment."""
    return parse_agents(path)[0]


def parse_agents(path: str) -> tuple[dict[str, bytes], dict[str, set[str]]]:
    """The agents file: secrets, and whose volumes each agent may recover
    (``recover=OWNER,...``; ``recover=*``: every volume) besides its own."""
    agents, rights = {}, {}
    with open(path, encoding="utf-8") as f:
        check_secret_file_mode(path, os.fstat(f.fileno()))
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                agent_id, secret, *options = line.split()
                p.validate_name(agent_id, "agent id")
                agents[agent_id] = p.parse_secret(secret)
                for opt in options:
                    key, _, value = opt.partition("=")
                    if key != "recover" or not value:
                        raise ValueError(f"unknown option {opt!r}, expected recover=OWNER,...")
                    rights.setdefault(agent_id, set()).update(value.split(","))
            except (ValueError, p.ReplicationError) as err:
                raise StoreError(f"{path}:{lineno}: expected 'AGENT_ID SECRET_HEX "
                                 f"[recover=OWNER,...]': {err}") from err
    return agents, rights


def add_agent(path: str, agent_id: str, recover_for=()) -> str:
    """Add an agent with a fresh secret to the agents file (mode 0600); return the secret.

    ``recover_for``: owners whose volumes it may open recovery sessions on."""
    p.validate_name(agent_id, "agent id")
    for owner in recover_for:
        if owner != "*":
            p.validate_name(owner, "--recover-for agent id")
    lines = []
    if os.path.exists(path):
        if agent_id in load_agents(path):
            raise StoreError(f"agent {agent_id!r} is already in {path}")
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    secret = secrets.token_hex(32)
    lines.append(f"{agent_id} {secret}" + (f" recover={','.join(recover_for)}"
                                           if recover_for else ""))
    atomic_write(path, ("\n".join(lines) + "\n").encode(), mode=0o600)
    os.chmod(path, 0o600)
    return secret


class AgentsFile:
    """The agents file, re-read when it changes (add-agent works while the hub runs).

    Threads::

        *                    conn-HOST:PORT (the handshake, RECOVER_OPEN); takes lock
    """

    def __init__(self, path: str):
        self.path = path
        self.stamp = None
        self.agents: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.get("")  # fail early on a bad file

    def get(self, agent_id: str) -> bytes | None:
        with self.lock:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self.stamp:
                self.agents, self.rights = parse_agents(self.path)
                self.stamp = stamp
            return self.agents.get(agent_id)

    def may_recover(self, agent_id: str, owner: str) -> bool:
        """May ``agent_id`` open recovery sessions on ``owner``'s volumes?"""
        self.get(agent_id)
        allowed = self.rights.get(agent_id, set())
        return agent_id == owner or owner in allowed or "*" in allowed


# ---------------------------------------------------------------------------
# Segment logs: the journal and the undo log share this format


class Journal:
    """The hub's one journal: every WRITE/ZERO/READ_REPLY/CHECKPOINT, in stream order.

    ``append`` (recv loops, under ``lock``) gives each record the next global
    sequence number; ``wait_durable`` blocks until the committer thread has
    fdatasync'ed past it.  Group commit: the committer takes everything
    appended so far, runs one fdatasync, and wakes every waiter it covered.

    Threads::

        open, start, stop, close  main
        append, fence        any thread; takes lock
        resume               storage-watch
        drop_segment         applier (retention)
        release_spares       storage-watch, applier; takes lock
        wait_durable         any thread; waits on durable_cond
        *                    any thread
    """

    def __init__(self, directory: str, segment_bytes: int = SEGMENT_BYTES,
                 health: Health | None = None):
        self.log = SegmentLog(directory, "journal", segment_bytes, SPARE_BYTES)
        self.health = health or Health()
        self.lock = threading.Lock()
        self.durable_cond = threading.Condition(threading.Lock())
        self.records = RecordTable()   # records[seq - first_seq]
        self.first_seq = 1
        self.last_seq = 0          # appended
        self.durable_seq = 0       # fdatasync'ed
        self.last_time_ns = 0
        self.checkpoints: list[tuple[int, int, str, str]] = []  # (seq, time, agent, name)
        self.lost: list[tuple[int, int | None, dict]] = []  # (seq, volume id, damage)
        self.data_sums: dict[int, DataSums] = {}  # seq -> its data's sums, until applied
        self.commits = 0           # fdatasync rounds of the committer
        self.failed: BaseException | None = None
        self.stop_event = threading.Event()
        self.committer: threading.Thread | None = None

    def open(self, start_seq: int = 1) -> None:
        """Load the records; ``start_seq`` is the next seq if the journal is empty."""
        self.records = RecordTable()
        scanned = self.log.open()
        damaged_after = {d["after_seq"]: d for d in self.log.damage}
        after = None                      # the seq of the last record kept
        for rec in scanned:
            if after is not None:
                expected = after + 1
            elif None in damaged_after:   # damage first: a segment is named by its first seq
                expected = damaged_after[None]["segment"]
            else:
                expected = start_seq
            if rec.seq != expected and (after in damaged_after and rec.seq > expected):
                self.records.extend(self._lost(expected, rec.seq, damaged_after[after],
                                               rec.time_ns))
            elif rec.seq != expected and after is not None:
                raise StoreError(f"journal seq jumps from {after} to {rec.seq} "
                                 f"(segment {self.log.path(rec.segment)})")
            self.records.append(rec)
            after = rec.seq
        # Damage at the end of an older segment: the next one's name is its first seq.
        segments = self.log.segments()
        after = self.records[-1].seq if self.records else None
        expected = after + 1 if self.records else start_seq
        if (after in damaged_after and segments and segments[-1] > expected
                and damaged_after[after]["segment"] != segments[-1]):
            self.records.extend(self._lost(expected, segments[-1], damaged_after[after],
                                           self.records[-1].time_ns if self.records else 0))
        if self.records:
            self.first_seq = self.records[0].seq
            self.last_seq = self.records[-1].seq
            self.last_time_ns = self.records[-1].time_ns
        else:
            self.first_seq = start_seq
            self.last_seq = start_seq - 1
        self.durable_seq = self.last_seq
        for rec in self.records:
            if rec.kind == RecordKind.CHECKPOINT:
                agent, name = decode_checkpoint(self.log.read_payload(rec))
                self.checkpoints.append((rec.seq, rec.time_ns, agent, name))

    def _lost(self, first: int, end: int, damage: dict, time_ns: int) -> list[Record]:
        """Stand-ins for records ``first`` .. ``end - 1`` lost to damage at rest: they
        keep the seqs in order and are never applied (``lost`` lists them)."""
        out = []
        for seq in range(first, end):
            volume = damage["volume"] if damage["seq"] == seq else None
            self.lost.append((seq, volume, damage))
            out.append(Record(seq, time_ns, RecordKind.LOST, 0, volume or 0, 0, 0, 0, 0,
                              damage["segment"], -1))
        return out

    def start(self) -> None:
        self.committer = threading.Thread(target=self._commit_loop, name="journal-committer",
                                          daemon=True)
        self.committer.start()

    def append(self, kind: RecordKind, volume: int, offset: int, length: int,
               parts: list = (), payload_crc: int | None = None, flags: int = 0,
               check=None, sums: DataSums | None = None) -> Record:
        """Append one record; return it (not yet durable).  Any thread.

        ``check`` runs under the journal lock first and may refuse the record.
        ``sums``, its data's, are kept for the applier (``take_data_sums``):
        under the lock, so before the record can be durable and applied.
        A record that cannot be written is not in the journal at all (the
        segment is cut back to its start): JournalRefused, and the journal
        refuses every record until the storage watcher clears the fault."""
        if self.failed:
            raise JournalRefused(f"hub journal failed: {self.failed}")
        with self.lock:
            if check is not None:
                check()
            fault = self.health.journal_fault()
            if fault is not None:
                raise JournalRefused(f"hub storage degraded ({fault}): record not journaled")
            seq = self.last_seq + 1
            now = max(time.time_ns(), self.last_time_ns)
            try:
                rec = self.log.append(seq, kind, flags, now, volume, offset, length,
                                      list(parts), payload_crc)
            except OSError as err:
                self.health.fail(journal_fault_of(err), f"append of seq {seq} failed: {err}")
                raise JournalRefused(f"hub journal append failed: {err}") from err
            self.records.append(rec)
            if sums is not None and len(self.data_sums) < DATA_SUMS_KEPT:
                self.data_sums[seq] = sums
            self.last_seq = seq
            self.last_time_ns = now
            if kind == RecordKind.CHECKPOINT:
                agent, name = decode_checkpoint(b"".join(bytes(x) for x in parts))
                self.checkpoints.append((seq, now, agent, name))
        with self.durable_cond:
            self.durable_cond.notify_all()
        return rec

    def take_data_sums(self, seq: int) -> DataSums | None:
        """The sums ``append`` was given for record ``seq``, once (the applier)."""
        return self.data_sums.pop(seq, None)

    def _commit_loop(self) -> None:
        """Committer thread: one fdatasync per round covers every record appended so far."""
        while True:
            with self.durable_cond:
                while self.durable_seq >= self.last_seq and not self.stop_event.is_set():
                    self.durable_cond.wait(0.5)
                if self.durable_seq >= self.last_seq and self.stop_event.is_set():
                    return
            with self.lock:
                target = self.last_seq
                work = self.log.take_sync_work()
            try:
                self.log.do_sync(work)
            except OSError as err:
                # Whether the records since the last commit reached the disk is
                # unknown: none of them is ever acknowledged.
                self.health.fail(Fault.JOURNAL_IO, f"fdatasync failed: {err}; no further "
                                 "record is acknowledged until the hub restarts")
                self.failed = err
                with self.durable_cond:
                    self.durable_cond.notify_all()
                return
            with self.durable_cond:
                self.durable_seq = target
                self.commits += 1
                self.durable_cond.notify_all()

    def wait_durable(self, seq: int, timeout: float | None = None) -> bool:
        """Block until record ``seq`` is durable; False on timeout or journal failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.durable_cond:
            while self.durable_seq < seq:
                if self.failed:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self.durable_cond.wait(remaining if remaining is not None else 1.0)
            return True

    def fence(self, change) -> int:
        """Run ``change()`` under the append lock and return the last seq appended.

        Every later ``append`` runs its ``check`` after ``change``, so a state
        ``change`` sets (a promotion, a fail-back's fence) that the check
        refuses holds for every record after the seq returned.  ``change``
        is in-memory work only: every append waits for it."""
        with self.lock:
            change()
            return self.last_seq

    def resume(self) -> None:
        """Take records again after a storage fault (the storage watcher): a
        segment a failed append left broken is first cut back to its last
        whole record.  OSError if that still fails (the fault stays)."""
        with self.lock:
            if self.log.broken is not None:
                self.log.repair()
            for fault in JOURNAL_FAULTS:
                self.health.clear(fault)

    def drop_segment(self, seg: int, nxt: int) -> None:
        """Retention: forget the records before ``nxt`` and delete segment
        ``seg``, which holds them (``nxt`` is the next segment's first seq),
        or keep its file as a spare while no write of the store fails."""
        with self.lock:
            del self.records[:max(nxt - self.first_seq, 0)]
            self.first_seq = nxt
            self.checkpoints = [c for c in self.checkpoints if c[0] >= nxt]
            faulted = (self.failed or self.health.journal_fault() is not None
                       or self.health.active(Fault.REPLICA_IO)
                       or self.health.active(Fault.METADATA_IO))
            self.log.delete_segment(seg, None if faulted else nxt)

    def release_spares(self) -> int:
        """Delete the spare segments (the disk is full: storage-watch, applier)."""
        with self.lock:
            return self.log.release_spares()

    def seq_at_time(self, t_ns: int) -> int | None:
        """The last durable seq at time ``t_ns``: the last record stamped at or
        before it (the durable end if that is the newest); None if ``t_ns`` is
        before the oldest record."""
        with self.lock:   # a search, not a list of every time: appends wait for the lock
            i = bisect.bisect_right(self.records.column("time_ns"), t_ns)
            if i == 0:
                return None
            return self.records[i - 1].seq if i < len(self.records) else self.durable_seq

    def record(self, seq: int) -> Record | None:
        with self.lock:
            i = seq - self.first_seq
            return self.records[i] if 0 <= i < len(self.records) else None

    def record_field(self, seq: int, name: str) -> int | None:
        """Field ``name`` of record ``seq`` (None if it is not in the journal):
        what ``record`` gives, at a fraction of its cost, for the applier's
        per-record bookkeeping and its readiness check."""
        with self.lock:
            i = seq - self.first_seq
            return self.records.field(i, name) if 0 <= i < len(self.records) else None

    def records_between(self, after: int, upto: int, max_count: int) -> list[Record]:
        with self.lock:
            lo = max(after + 1 - self.first_seq, 0)
            hi = min(upto - self.first_seq + 1, lo + max_count, len(self.records))
            return self.records[lo:hi]

    @property
    def fdatasyncs(self) -> int:
        return self.log.fdatasyncs

    def stop(self) -> None:
        """Make everything durable and stop the committer (the stopping thread).

        The segments stay open for reading: the applier may still be copying."""
        self.stop_event.set()
        with self.durable_cond:
            self.durable_cond.notify_all()
        if self.committer:
            self.committer.join(timeout=30)

    def close(self) -> None:
        """Close the segment files (after ``stop``, once the applier is done)."""
        with self.lock:
            self.log.close()


@dataclasses.dataclass(slots=True)
class Record:
    """One record's header and where its payload lies (never the payload)."""

    seq: int
    time_ns: int
    kind: int
    flags: int
    volume: int
    offset: int
    length: int
    payload_length: int
    payload_crc: int
    segment: int  # the segment's id (first seq it was created for)
    pos: int      # file position of the payload

    @property
    def end(self) -> int:
        return self.offset + self.length


class RecordTable:
    """Records in seq order, packed in one array per field: 62 bytes each
    where a list of Record objects takes about 390 (a 16 GiB journal of 4 KiB
    writes holds 4 Mi records).  A list of Records to its users: index,
    slice, iterate, append, extend, ``del table[a:b]``;
    every Record read out is made anew (they are never changed in place).
    ``column`` gives one field's array, to bisect a field the records are
    sorted by (seq, segment) or to scan one without making Records.  Not
    locked itself, and changed in place: its owner's lock guards it.

    Threads::

        *                    any thread, under Journal.lock (the journal's) or
                             VolumeStore.apply_lock (a volume's undo index); main at open
    """

    FIELDS = tuple(f.name for f in dataclasses.fields(Record))
    CODES = "QQBBIQQIIqq"   # the record header's widths; segment and pos may be -1
    fields_of = operator.attrgetter(*FIELDS)
    COLUMN = {name: i for i, name in enumerate(FIELDS)}

    def __init__(self, records=()):
        self.cols = [array.array(code) for code in self.CODES]
        self.extend(records)

    def __len__(self) -> int:
        return len(self.cols[0])

    def append(self, rec: Record) -> None:
        for col, value in zip(self.cols, self.fields_of(rec)):
            col.append(value)

    def extend(self, records) -> None:
        for col, values in zip(self.cols, zip(*map(self.fields_of, records))):
            col.extend(values)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [Record(*t) for t in zip(*(col[i] for col in self.cols))]
        return Record(*(col[i] for col in self.cols))

    def __iter__(self):
        return (Record(*t) for t in zip(*self.cols))

    def column(self, name: str) -> array.array:
        return self.cols[self.COLUMN[name]]

    def field(self, i: int, name: str) -> int:
        """Field ``name`` of record ``i``, without making the Record."""
        return self.cols[self.COLUMN[name]][i]

    def span(self, name: str, lo: int, hi: int) -> slice:
        """The records whose ``name`` (a field they are sorted by) lies in [lo, hi]."""
        col = self.column(name)
        return slice(bisect.bisect_left(col, lo), bisect.bisect_right(col, hi))

    def __delitem__(self, i: slice) -> None:
        for col in self.cols:
            del col[i]


def encode_checkpoint(agent: str, name: str) -> bytes:
    a, n = agent.encode(), name.encode()
    return TEXT_LEN.pack(len(a)) + a + TEXT_LEN.pack(len(n)) + n


def decode_checkpoint(payload: bytes) -> tuple[str, str]:
    (n,) = TEXT_LEN.unpack_from(payload, 0)
    agent = payload[2:2 + n].decode()
    (m,) = TEXT_LEN.unpack_from(payload, 2 + n)
    return agent, payload[4 + n:4 + n + m].decode()


class SegmentLog:
    """An append-only log in numbered segment files ``<first seq>.seg``.

    ``append`` is called under the owner's lock and is all or nothing (a
    failed one is cut off the file before anything else is appended);
    ``take_sync_work``/``do_sync`` make everything appended so far durable
    (fdatasync of each touched segment, and of the directory when a segment
    was created).  ``open`` scans the segments, cuts a torn tail off the last
    one, reports damage anywhere else in ``damage`` (never cutting it), and
    returns the records found.

    With ``spare_bytes`` > 0 (the journal, whose seqs run on by one from segment
    to segment) a dropped segment may be kept as ``<bound>.spare``, every record
    in it older than seq ``bound``, and a new segment is that file renamed and
    written over from its start.  Past a segment's last record its file may
    then hold records of its earlier use: they are older than the segment's
    first seq (its name), so the scan never takes them -- in the last segment
    they end the records like a torn tail, and an older segment ends with the
    record just before the next segment's first seq.

    Threads::

        open, quarantine, close  main, before the other threads start or after they stop
        append, repair       any thread, with the owner's lock held
        take_sync_work       journal-committer or applier, with the owner's lock held
        do_sync              journal-committer or applier, with no lock held
        copy_payload, drop_cached, delete_segment  applier
        release_spares       storage-watch or applier, with the owner's lock held
        *                    any thread
    """

    def __init__(self, directory: str, what: str, segment_bytes: int = SEGMENT_BYTES,
                 spare_bytes: int = 0):
        self.dir = directory
        self.what = what
        self.segment_bytes = segment_bytes
        self.spare_limit = spare_bytes
        self.spares: dict[int, int] = {}  # spare files: bound -> size, oldest first
        self.recycled = 0                 # segments started over a spare
        self.fd: int | None = None        # current segment, written at ``size``
        self.segment: int | None = None   # its id
        self.size = 0                     # the end of its last record
        self.read_ahead: int | None = None  # over a spare: how far it is asked in
        self.broken: int | None = None    # size to cut it back to (a failed append)
        self.unsynced: list[int] = []     # older segment fds not yet fdatasync'ed
        self.dir_dirty = False
        self.read_fds: dict[int, int] = {}
        self.segment_sizes: dict[int, int] = {}
        self.damage: list[dict] = []      # found by ``open``: see ``_damaged``
        self.fdatasyncs = 0
        self.read_lock = threading.Lock()
        self.kernel_copy = hasattr(os, "copy_file_range")
        makedirs_private(directory)

    def path(self, segment: int) -> str:
        return os.path.join(self.dir, f"{segment:020d}.seg")

    def segments(self) -> list[int]:
        return self._numbered(".seg")

    def _numbered(self, suffix: str) -> list[int]:
        out = []
        for name in os.listdir(self.dir):
            if name.endswith(suffix) and name[:-len(suffix)].isdigit():
                out.append(int(name[:-len(suffix)]))
        return sorted(out)

    def spare_path(self, bound: int) -> str:
        return os.path.join(self.dir, f"{bound:020d}.spare")

    def open(self) -> list[Record]:
        """Scan every segment; return its records.  Runs once, before any thread."""
        records: list[Record] = []
        segments = self.segments()
        for i, segment in enumerate(segments):
            last = i == len(segments) - 1
            ends_at = None if last or not self.spare_limit else segments[i + 1] - 1
            records.extend(self._scan(segment, last, records[-1].seq if records else None,
                                      ends_at))
        if segments:
            self.segment = segments[-1]
            self.fd = os.open(self.path(self.segment), os.O_WRONLY)
            self.size = self.segment_sizes[self.segment]
        self.spares = {b: os.path.getsize(self.spare_path(b))
                       for b in self._numbered(".spare")} if self.spare_limit else {}
        return records

    def _scan(self, segment: int, last: bool, prev_seq: int | None = None,
              ends_at: int | None = None) -> list[Record]:
        """The records of one segment.  Bytes that hold no whole record are
        either a torn tail -- nothing valid follows them in the last segment:
        an append that never completed, hence never acknowledged, cut off -- or
        damage at rest (a bad record with valid ones after it, or in an older
        segment): kept, copied aside, and reported in ``damage``, never cut.
        ``ends_at``: the seq of the segment's last record (the next segment's
        first seq - 1); what follows it is the file's earlier use."""
        path = self.path(segment)
        with open(path, "rb") as f:
            data = f.read()
        out: list[Record] = []
        pos = 0
        while pos < len(data):
            rec, problem = self._parse(data, pos, segment)
            if rec is not None:
                out.append(rec)
                pos = rec.pos + rec.payload_length
                if rec.seq == ends_at:
                    break
                continue
            resume = self._next_record(data, pos + 1, segment)
            if resume is None and last:
                self._cut_tail(path, pos, len(data) - pos, problem,
                               self._stale_after(data, pos, segment))
                data = data[:pos]
                break
            end = len(data) if resume is None else resume
            self._damaged(segment, pos, end, problem, out[-1].seq if out else prev_seq,
                          RECORD.unpack_from(data, pos) if len(data) - pos >= RECORD.size
                          else None)
            pos = end
        self.segment_sizes[segment] = pos
        return out

    def _cut_tail(self, path: str, pos: int, n: int, problem: str, stale: bool) -> None:
        """Cut the last segment's bytes after its last whole record off (a later
        run could otherwise take a stray record among them for a new one)."""
        if stale:
            log.info("%s: %s ends at byte %d; the %d bytes after it are left from the "
                     "file's earlier use, and from an append never acknowledged if one was "
                     "cut short (%s): cut off", self.what, path, pos, n, problem)
        else:
            log.warning("%s: torn tail in %s at byte %d (%s); discarding %d bytes, "
                        "never acknowledged", self.what, path, pos, problem, n)
        with open(path, "r+b") as f:
            f.truncate(pos)
            os.fsync(f.fileno())

    def _parse(self, data: bytes, pos: int, segment: int) -> tuple[Record | None, str | None]:
        """The whole record at ``pos``, or (None, what is wrong with it)."""
        if len(data) - pos < RECORD.size:
            return None, f"{len(data) - pos} bytes of a record header"
        (magic, kind, flags, _res, seq, time_ns, volume, plen, offset, length,
         payload_crc, header_crc) = RECORD.unpack_from(data, pos)
        if magic != RECORD_MAGIC:
            return None, f"bad record magic 0x{magic:08x}, expected 0x{RECORD_MAGIC:08x}"
        crc = zlib.crc32(memoryview(data)[pos:pos + RECORD_BODY.size])
        if crc != header_crc:
            return None, f"bad record header_crc 0x{header_crc:08x}, computed 0x{crc:08x}"
        if self.spare_limit and seq < segment:
            return None, f"{STALE_RECORD} seq {seq}, before the segment's first seq {segment}"
        start = pos + RECORD.size
        if start + plen > len(data):
            return None, f"payload of {plen} bytes cut short at {len(data) - start}"
        crc = zlib.crc32(memoryview(data)[start:start + plen])
        if crc != payload_crc:
            return None, f"bad record payload_crc 0x{payload_crc:08x}, computed 0x{crc:08x}"
        return Record(seq, time_ns, kind, flags, volume, offset, length, plen, payload_crc,
                      segment, start), None

    def _stale_after(self, data: bytes, pos: int, segment: int) -> bool:
        """Do the bytes from ``pos`` hold a record header of the file's earlier use?"""
        if not self.spare_limit:
            return False
        while 0 <= (pos := data.find(RECORD_MAGIC_BYTES, pos)) <= len(data) - RECORD.size:
            header = RECORD.unpack_from(data, pos)
            if self._intact(header) and header[4] < segment:
                return True
            pos += 1
        return False

    @staticmethod
    def _intact(header) -> bool:
        """Does an unpacked RECORD header have its magic and header CRC?"""
        return header[0] == RECORD_MAGIC and zlib.crc32(
            RECORD_BODY.pack(*header[:11])) == header[11]

    def _next_record(self, data: bytes, pos: int, segment: int) -> int | None:
        """Where the next whole record after damage at ``pos`` starts, or None."""
        while (pos := data.find(RECORD_MAGIC_BYTES, pos)) >= 0:
            if self._parse(data, pos, segment)[0] is not None:
                return pos
            pos += 1
        return None

    def _damaged(self, segment: int, start: int, end: int, problem: str,
                 after_seq: int | None, header) -> None:
        """Report damage at rest; copy the segment aside once (quarantine)."""
        path = self.path(segment)
        # The header, if it survived, says which record was lost.
        known = header is not None and self._intact(header)
        seq, volume = (header[4], header[6]) if known else (None, None)
        aside = os.path.join(os.path.dirname(self.dir), QUARANTINE_DIR,
                             f"{os.path.basename(self.dir)}-{segment:020d}.seg.at-{start}")
        new = not os.path.exists(aside)
        (log.error if new else log.info)(
            "%s: %s is damaged at bytes %d..%d (%s), after seq %s; %s; later records are "
            "intact and kept (copy: %s)", self.what, path, start, end, problem, after_seq,
            f"the record is seq {seq} of volume id {volume}" if known
            else "which record it held is unknown", aside)
        self.damage.append(dict(segment=segment, start=start, end=end, problem=problem,
                                after_seq=after_seq, seq=seq, volume=volume, copy=aside,
                                new=new))

    def quarantine(self, damage: dict) -> None:
        """Copy a damaged segment aside (once: the copy marks the damage as handled)."""
        aside = damage["copy"]
        try:
            makedirs_private(os.path.dirname(aside))
            fd = os.open(aside + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
            with open(fd, "wb") as out, open(self.path(damage["segment"]), "rb") as src:
                shutil.copyfileobj(src, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(aside + ".tmp", aside)
            fsync_dir(os.path.dirname(aside))
        except OSError as err:
            log.error("%s: could not copy damaged segment %s aside: %s", self.what,
                      self.path(damage["segment"]), err)

    def append(self, seq: int, kind: int, flags: int, time_ns: int, volume: int,
               offset: int, length: int, parts: list, payload_crc: int | None = None
               ) -> Record:
        """Write one record (caller holds the owner's lock).  Not yet durable."""
        plen = sum(len(x) for x in parts)
        if payload_crc is None:
            payload_crc = 0
            for part in parts:
                payload_crc = zlib.crc32(part, payload_crc)
        if self.broken is not None:
            self.repair()
        if self.fd is None or (self.size and self.size + RECORD.size + plen > self.segment_bytes):
            self._roll(seq)
        header = encode_record(kind, flags, seq, time_ns, volume, offset, length,
                               plen, payload_crc)
        buffers = [header, *parts]
        total = RECORD.size + plen
        try:
            written = os.pwritev(self.fd, buffers, self.size)
            if written != total:  # short write (disk full, ...): finish it or fail
                blob = b"".join(bytes(b) for b in buffers)
                while written < total:
                    written += os.pwrite(self.fd, blob[written:], self.size + written)
        except OSError:
            # All or nothing: cut the torn record off before anything else lands
            # after it, so that every position kept in memory is the one on disk.
            self.broken = self.size
            self.repair()
            raise
        rec = Record(seq, time_ns, kind, flags, volume, offset, length, plen, payload_crc,
                     self.segment, self.size + RECORD.size)
        self.size += total
        self.segment_sizes[self.segment] = self.size
        if self.read_ahead is not None and plen < READ_AHEAD_RECORD:
            self._read_ahead()
        return rec

    def _read_ahead(self) -> None:
        """In a segment written over a spare, ask the kernel to read the spare's
        bytes a little ahead of the next appends (POSIX_FADV_WILLNEED, done in
        the background).  A record that ends inside a page not in the page cache
        makes its write read that page first, on the write's path: for small
        records that is every one (4 KiB write + fdatasync measured 142-173 us
        over a spare not cached, 102-109 us asked in ahead, 238 us appended)."""
        if self.size + READ_AHEAD // 2 < self.read_ahead:
            return
        try:
            os.posix_fadvise(self.fd, self.read_ahead, READ_AHEAD, os.POSIX_FADV_WILLNEED)
        except OSError as err:   # advice only
            log.debug("%s: posix_fadvise of %s: %s", self.what, self.path(self.segment), err)
        self.read_ahead += READ_AHEAD

    def repair(self) -> None:
        """Cut the current segment back to ``broken``, the end of its last whole
        record, and make that durable; until it succeeds no record is appended
        (raises the OSError, and ``broken`` stays set)."""
        os.ftruncate(self.fd, self.broken)
        os.fdatasync(self.fd)
        log.info("%s: segment %s cut back to byte %d after a failed append", self.what,
                 self.path(self.segment), self.broken)
        self.broken = None

    def _roll(self, seq: int) -> None:
        """Start segment ``seq``: over a spare whose records are all older, else new."""
        self.read_ahead = None
        while self.spares:
            bound = next(iter(self.spares))
            del self.spares[bound]
            try:
                if bound <= seq:
                    os.rename(self.spare_path(bound), self.path(seq))
                    self.recycled += 1
                    self.read_ahead = 0
                    break
                os.unlink(self.spare_path(bound))   # not older: never written over
            except OSError as err:
                log.warning("%s: spare segment %s not used: %s", self.what,
                            self.spare_path(bound), err)
        fd = os.open(self.path(seq), os.O_WRONLY | os.O_CREAT, PRIVATE_FILE)
        if self.fd is not None:
            self.unsynced.append(self.fd)
        self.segment = seq
        self.fd = fd
        self.size = 0
        self.segment_sizes[seq] = 0
        self.dir_dirty = True
        if self.read_ahead is not None:
            self._read_ahead()

    def take_sync_work(self) -> tuple[list[int], int | None, bool]:
        """Under the owner's lock: what ``do_sync`` must flush (fds to close, fd, dir)."""
        old, self.unsynced = self.unsynced, []
        dir_dirty, self.dir_dirty = self.dir_dirty, False
        return old, self.fd, dir_dirty

    def do_sync(self, work) -> None:
        """fdatasync what ``take_sync_work`` returned (outside the owner's lock)."""
        old, fd, dir_dirty = work
        for ofd in old:
            os.fdatasync(ofd)
            self.fdatasyncs += 1
            os.close(ofd)
        if fd is not None:
            os.fdatasync(fd)
            self.fdatasyncs += 1
        if dir_dirty:
            fsync_dir(self.dir)

    def _read_fd(self, segment: int) -> int:
        """A file descriptor of ``segment`` open for reading (kept; any thread)."""
        with self.read_lock:
            fd = self.read_fds.get(segment)
            if fd is None:
                fd = self.read_fds[segment] = os.open(self.path(segment), os.O_RDONLY)
            return fd

    def read_payload(self, rec: Record) -> bytes:
        """The payload of ``rec`` (any thread)."""
        data = os.pread(self._read_fd(rec.segment), rec.payload_length, rec.pos)
        if len(data) != rec.payload_length:
            raise StoreError(f"{self.what} record seq {rec.seq} is cut short in "
                             f"{self.path(rec.segment)}")
        return data

    def copy_payload(self, rec: Record, fd: int, offset: int) -> None:
        """Copy ``rec``'s payload into file ``fd`` at ``offset`` inside the kernel
        (copy_file_range: no trip through user space), else by pread/pwrite."""
        src = self._read_fd(rec.segment)
        done = 0
        if self.kernel_copy:
            try:
                while done < rec.payload_length:
                    n = os.copy_file_range(src, fd, rec.payload_length - done,
                                           rec.pos + done, offset + done)
                    if n == 0:
                        break
                    done += n
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                     errno.EOPNOTSUPP):
                    raise  # a full or failing disk, not a missing feature
                log.info("copy_file_range unavailable (%s); copying through memory", err)
                self.kernel_copy = False
        if done < rec.payload_length:
            data = os.pread(src, rec.payload_length - done, rec.pos + done)
            if len(data) != rec.payload_length - done:
                raise StoreError(f"{self.what} record seq {rec.seq} is cut short in "
                                 f"{self.path(rec.segment)}")
            os.pwrite(fd, data, offset + done)

    def drop_cached(self, records: list[Record]) -> None:
        """The payloads of ``records`` (consecutive, durable, applied) are not read
        again soon: let the page cache free their pages now, so that the next
        appends take pages just freed rather than pages never touched (on this
        kind of VM, whose host takes free memory back, a first touch costs
        about 2 ms per MiB written)."""
        spans: dict[int, list[int]] = {}
        for rec in records:
            if rec.pos >= 0:                      # not a LOST stand-in
                span = spans.setdefault(rec.segment, [rec.pos - RECORD.size, 0])
                span[1] = rec.pos + rec.payload_length
        for segment, (start, end) in spans.items():
            try:
                os.posix_fadvise(self._read_fd(segment), start, end - start,
                                 os.POSIX_FADV_DONTNEED)
            except OSError as err:   # advice only: the records stay where they are
                log.debug("%s: posix_fadvise of %s: %s", self.what, self.path(segment), err)

    def delete_segment(self, segment: int, spare_bound: int | None = None) -> None:
        """Remove a whole segment (never the current one); keep it as a spare if
        ``spare_bound`` is given (every record in it is older) and there is room."""
        with self.read_lock:
            fd = self.read_fds.pop(segment, None)
            if fd is not None:
                os.close(fd)
        self.segment_sizes.pop(segment, None)
        size = os.path.getsize(self.path(segment)) if spare_bound is not None else 0
        if spare_bound is not None and self._room_for_spare(size):
            os.rename(self.path(segment), self.spare_path(spare_bound))
            self.spares[spare_bound] = size
        else:
            os.unlink(self.path(segment))
        self.dir_dirty = True

    def _room_for_spare(self, size: int) -> bool:
        """May one more spare of ``size`` bytes be kept (SPARE_BYTES, SPARE_FREE_FRACTION)?"""
        if self.spare_total() + size > self.spare_limit:
            return False
        st = os.statvfs(self.dir)
        return st.f_bavail * SPARE_FREE_FRACTION >= st.f_blocks

    def spare_total(self) -> int:
        """The bytes the spare segments hold."""
        return sum(self.spares.values())

    def release_spares(self) -> int:
        """Delete the spare segments (their space is wanted); return how many."""
        n = 0
        while self.spares:
            os.unlink(self.spare_path(self.spares.popitem()[0]))
            n += 1
        if n:
            self.dir_dirty = True
        return n

    def total_bytes(self) -> int:
        return sum(self.segment_sizes.values())

    def close(self) -> None:
        if self.fd is not None and self.broken is None and self.spare_limit:
            try:  # the bytes of a recycled file's earlier use: the next open is clean
                if os.fstat(self.fd).st_size > self.size:
                    os.ftruncate(self.fd, self.size)
            except OSError as err:
                log.info("%s: segment not cut to its last record at close: %s", self.what, err)
        for fd in self.unsynced + ([self.fd] if self.fd is not None else []):
            try:
                os.fdatasync(fd)
            except OSError as err:  # only records never acknowledged are at stake
                log.error("%s: fdatasync at close failed: %s", self.what, err)
            os.close(fd)
        self.unsynced, self.fd = [], None
        with self.read_lock:
            for fd in self.read_fds.values():
                os.close(fd)
            self.read_fds.clear()


def encode_record(kind: int, flags: int, seq: int, time_ns: int, volume: int,
                  offset: int, length: int, payload_length: int, payload_crc: int) -> bytes:
    body = RECORD_BODY.pack(RECORD_MAGIC, kind, flags, 0, seq, time_ns, volume,
                            payload_length, offset, length, payload_crc)
    return body + struct.pack("!I", zlib.crc32(body))


# ---------------------------------------------------------------------------
# Volumes and the store


@dataclasses.dataclass(frozen=True)
class DataSums:
    """The CRC-32 of each whole CHECK_CHUNK chunk of a volume that a frame's data
    covers (chunks ``first``, ``first + 1``, ...), summed as its payload CRC
    was checked (``of_frame``).  The journal keeps them until the applier has
    copied the data into the replica, which then takes them as its sums of
    those chunks (``ReplicaSums.note``) instead of reading the chunks back.

    Threads::

        of_frame                   conn-HOST:PORT (the recv loop)
        of_chunk                   applier (immutable: any thread)
    """

    first: int
    crcs: array.array

    @classmethod
    def of_frame(cls, offset: int, payload) -> tuple[int, DataSums | None]:
        """The CRC-32 of ``payload``, data at volume ``offset``, and its chunks'
        sums (None if it covers no chunk wholly)."""
        head = -offset % CHECK_CHUNK
        crc, crcs = p.crc32_pieces(payload, head, CHECK_CHUNK)
        return crc, cls((offset + head) // CHECK_CHUNK, array.array("I", crcs)) if crcs else None

    def of_chunk(self, chunk: int) -> int | None:
        i = chunk - self.first
        return self.crcs[i] if 0 <= i < len(self.crcs) else None


class ReplicaSums:
    """The replica's checksums: CRC-32 of each CHECK_CHUNK, as the applier last
    wrote it (0 = not known yet: a volume from before checksums, or a chunk
    never written).  ``note`` after writing the replica (under the store's
    apply lock), ``flush`` before ``applied_seq`` is persisted, so after a
    crash every chunk the journal will not write again has its sum on disk.

    Sums noted since the last flush are ``pending``, per chunk, and
    ``zeroed``, runs of whole chunks a ZERO covered: a zero extent costs
    what its ends cost, not one entry per chunk (a sparse 1 TiB volume's
    first sync zeroes 16 Mi chunks).  A run is older than the ``pending``
    entries of its chunks: adding it removes theirs.

    Threads::

        note, flush          applier, or control-N rolling a promoted volume back; under apply_lock
        close                main
        *                    any thread
    """

    def __init__(self, directory: str, size: int):
        self.fd = os.open(os.path.join(directory, CHECKSUMS_FILE), os.O_RDWR | os.O_CREAT,
                          PRIVATE_FILE)
        self.size = size
        self.chunks = -(-size // CHECK_CHUNK)
        if os.fstat(self.fd).st_size < self.chunks * CHECK_ENTRY.size:
            os.ftruncate(self.fd, self.chunks * CHECK_ENTRY.size)
        self.pending: dict[int, int] = {}
        self.zeroed: list[range] = []

    @staticmethod
    def kept(crc: int) -> int:
        """A chunk's CRC-32 as the file keeps it: never the "not known" 0."""
        return crc or 1

    #: A full chunk of zeroes, as kept.
    ZEROED_SUM = kept(zeroes_crc(CHECK_CHUNK))

    def note(self, replica_fd: int, offset: int, length: int,
             known: DataSums | None = None) -> None:
        """Sum the chunks [offset, offset + length) touches, as the replica has
        them: those that ``known`` (the data just written there) sums wholly
        from it, the others read back."""
        for c in range(offset // CHECK_CHUNK, -(-(offset + length) // CHECK_CHUNK)):
            crc = known.of_chunk(c) if known is not None else None
            if crc is None:
                crc = zlib.crc32(os.pread(replica_fd, self.chunk_len(c), c * CHECK_CHUNK))
            self.pending[c] = self.kept(crc)

    def note_zeroes(self, replica_fd: int, offset: int, length: int) -> None:
        """``note`` for a range just zeroed (``write_zeroes``): a chunk wholly
        inside it reads as zeroes, so its sum is known without reading it (the
        full-length ones as one run); a chunk it only touches is read and summed."""
        end = offset + length
        touched = range(offset // CHECK_CHUNK, -(-end // CHECK_CHUNK))
        first = -(-offset // CHECK_CHUNK)
        inside_stop = self.chunks if end >= self.size else end // CHECK_CHUNK
        run = range(first, max(first, min(inside_stop, self.size // CHECK_CHUNK)))
        if run:
            self._zeroed(run)
        for c in itertools.chain(range(touched.start, run.start), range(run.stop, touched.stop)):
            start, n = c * CHECK_CHUNK, self.chunk_len(c)
            if offset <= start and start + n <= end:   # a short last chunk, inside
                self.pending[c] = self.kept(zeroes_crc(n))
            else:
                self.note(replica_fd, start, n)

    def _zeroed(self, run: range) -> None:
        """Whole chunks of full length now read as zeroes: newer than their
        ``pending`` sums, which go."""
        if len(self.pending) < len(run):
            for c in [c for c in self.pending if c in run]:
                del self.pending[c]
        else:
            for c in run:
                self.pending.pop(c, None)
        if self.zeroed and self.zeroed[-1].stop == run.start:
            self.zeroed[-1] = range(self.zeroed[-1].start, run.stop)
        else:
            self.zeroed.append(run)

    def chunk_len(self, c: int) -> int:
        return min(CHECK_CHUNK, self.size - c * CHECK_CHUNK)

    def expected(self, first: int, count: int) -> list[int]:
        """The sums kept for chunks ``first .. first + count - 1``: one pread."""
        raw = os.pread(self.fd, count * CHECK_ENTRY.size, first * CHECK_ENTRY.size)
        sums = [s for (s,) in CHECK_ENTRY.iter_unpack(raw[:len(raw) // CHECK_ENTRY.size
                                                          * CHECK_ENTRY.size])]
        sums += [0] * (count - len(sums))
        # Noted since the last flush, newer than the file's: runs, then chunks.
        for run in self.zeroed:
            lo, hi = max(run.start, first), min(run.stop, first + count)
            if lo < hi:
                sums[lo - first:hi - first] = [self.ZEROED_SUM] * (hi - lo)
        if self.pending:
            for c in range(first, first + count):
                sums[c - first] = self.pending.get(c, sums[c - first])
        return sums

    def bad_chunks(self, data, first: int) -> list[int]:
        """The chunks of ``data`` (whole chunks from chunk ``first``) whose sum
        differs; a chunk whose sum is not known is not summed (the scrub)."""
        view = memoryview(data)
        wants = self.expected(first, -(-len(view) // CHECK_CHUNK))
        return [first + i for i, want in enumerate(wants) if want and self.kept(
                zlib.crc32(view[i * CHECK_CHUNK:(i + 1) * CHECK_CHUNK])) != want]

    def check(self, data, first: int) -> tuple[list[int], list[int]]:
        """Sum every chunk of ``data`` (whole chunks from chunk ``first``): the
        chunks whose sum differs from the one kept, and each chunk's CRC-32 as
        computed (a read's reply is summed from them: ``range_crc``)."""
        view = memoryview(data)
        count = -(-len(view) // CHECK_CHUNK)
        sums = [zlib.crc32(view[i * CHECK_CHUNK:(i + 1) * CHECK_CHUNK]) for i in range(count)]
        wants = self.expected(first, count)
        return [first + i for i, want in enumerate(wants)
                if want and self.kept(sums[i]) != want], sums

    def flush(self) -> None:
        """Write the sums noted since the last flush, each run of chunks in
        one pwrite (runs first: ``pending`` is newer), then fdatasync."""
        if not (self.pending or self.zeroed):
            return
        zero = CHECK_ENTRY.pack(self.ZEROED_SUM)
        for run in self.zeroed:
            for c in range(run.start, run.stop, SUMS_PER_WRITE):
                os.pwrite(self.fd, zero * min(SUMS_PER_WRITE, run.stop - c),
                          c * CHECK_ENTRY.size)
        # Consecutive chunks share c - i: each group is one run.
        chunks = enumerate(sorted(self.pending))
        for _, group in itertools.groupby(chunks, lambda ic: ic[1] - ic[0]):
            run = [c for _, c in group]
            os.pwrite(self.fd, b"".join(CHECK_ENTRY.pack(self.pending[c]) for c in run),
                      run[0] * CHECK_ENTRY.size)
        os.fdatasync(self.fd)
        self.pending, self.zeroed = {}, []

    def close(self) -> None:
        os.close(self.fd)


def range_crc(data, sums: list[int], start: int, stop: int) -> int:
    """CRC-32 of ``data[start:stop]`` given ``sums``, the CRC-32 of each
    CHECK_CHUNK of ``data``: whole chunks are combined, only a partial chunk
    at either edge is read again."""
    view, crc = memoryview(data), 0
    for i, chunk_crc in enumerate(sums):
        lo, hi = i * CHECK_CHUNK, min((i + 1) * CHECK_CHUNK, len(view))
        a, b = max(lo, start), min(hi, stop)
        if a >= b:
            continue
        crc = (p.crc32_combine(crc, chunk_crc, hi - lo) if (a, b) == (lo, hi)
               else zlib.crc32(view[a:b], crc))
    return crc


class ReplicaDamaged(p.RequestError):
    """A replica read whose checksum does not match (rot at rest)."""

    code = p.ErrorCode.IO_ERROR

    def __init__(self, vol_name: str, chunks: list[int]):
        super().__init__(f"replica of volume {vol_name} is damaged in {len(chunks)} chunk(s) "
                         f"at byte {chunks[0] * CHECK_CHUNK}: it is resynced from its agent")
        self.chunks = chunks


class Volume:
    """One replicated volume: ``replica`` (sparse raw) and ``metadata.json``.

    ``meta`` is what is persisted (name, id, size, chunk_size, owner,
    generation, state, full_synced, pending_plan, applied_seq,
    consistent_since_seq); the other attributes are run-time figures for status.

    Threads::

        update               any thread; takes lock
        close                main
        *                    any thread
    """

    def __init__(self, directory: str, meta: dict, health: Health | None = None):
        self.dir = directory
        self.meta = meta
        self.health = health or Health()
        self.lock = threading.Lock()
        self.fd = os.open(os.path.join(directory, "replica"), os.O_RDWR)
        self.sums = ReplicaSums(directory, meta["size"])
        self.undo = RecordTable()         # undo index, seq order (so segment order too)
        self.attached_to = None           # AgentConnection or None
        self.sync = None                  # running SyncJob or None
        self.last_sync: dict | None = None
        self.unapplied_bytes = 0          # journaled, not yet in the replica
        self.unapplied_since_ns = 0       # time of the oldest such record
        self.last_ack_ns = 0
        self.attach_lock = threading.RLock()   # attached_to, sync: take-over vs completion
        self.journaled_bytes = 0          # WRITE data journaled since start (metrics)
        self.failback = None              # the running (or last) Failback, for status
        self.promoting: dict | None = None  # a promotion decided, not yet persisted (Roles)
        self.last_scrub: dict | None = None

    name = property(lambda self: self.meta["name"])
    id = property(lambda self: self.meta["id"])
    size = property(lambda self: self.meta["size"])
    owner = property(lambda self: self.meta["owner"])
    state = property(lambda self: VolState(self.meta["state"]))
    role = property(lambda self: Role(self.meta.get("role", Role.PROTECTED)))

    def set_aside_of(self, seq: int) -> dict | None:
        """The promotion that set record ``seq`` of this volume aside, if any."""
        for pr in self.meta.get("promotions", ()):
            if pr["set_aside_from"] <= seq <= pr["set_aside_to"]:
                return pr
        return None

    def current_promotions(self) -> list[dict]:
        """The promotions since the last fail-back: what a fail-back undoes."""
        failbacks = self.meta.get("failbacks", ())
        since = failbacks[-1]["time_ns"] if failbacks else 0
        return [pr for pr in self.meta.get("promotions", ()) if pr["time_ns"] > since]

    def update(self, **changes) -> None:
        """Change and persist metadata atomically (any thread).  If it cannot be
        written, nothing changes, not even in memory: JournalRefused."""
        with self.lock:
            meta = self.meta | changes
            try:
                atomic_write_json(os.path.join(self.dir, "metadata.json"), meta)
            except OSError as err:
                self.health.fail(Fault.METADATA_IO, f"writing metadata.json failed: {err}",
                                 self.name)
                raise JournalRefused(f"hub cannot write the metadata of volume {self.name}: "
                                     f"{err}") from err
            self.meta = meta
        self.health.clear(Fault.METADATA_IO, self.name)

    def close(self) -> None:
        os.close(self.fd)
        self.sums.close()


class VolumeStore:
    """The data directory: volumes, the journal and the undo log, and the parts
    of the store that work on them.

    Layout (each file and its state: docs/DESIGN.md "rephub")::

        DIR/hub.json          hub id, next volume id
        DIR/applied.json      global seq the applier made durable in replicas
        DIR/journal/*.seg     WRITE/ZERO/CHECKPOINT records
        DIR/undo/*.seg        UNDO records (the bytes each record replaced)
        DIR/volumes/<name>/   replica, metadata.json, checksums, failback-<n>/
        DIR/scratch/          TEST recovery sessions' overlays
        DIR/quarantine/       copies of segments found damaged at rest
        DIR/control.sock      the running hub's control socket
        DIR/lock              flock'ed by whoever has the store open

    The store itself opens the directory (``open``: the flock, hub.json,
    every volume, the journal and undo log scans), creates volumes
    (``open_or_create``) and journals their records (``append_data``,
    ``append_checkpoint``, then ``journal.wait_durable(seq)``).  Its parts
    hold the rest, each with the state only it uses::

        applier   Applier: the applier thread; applier.wait_applied(seq)
        window    RecoveryWindow: points in time and retention;
                  window.resolve_point(vol, text) -> seq, window.read_at(vol, seq,
                  offset, length) -> the volume as it was right after record seq,
                  window.points(vol), window.export(vol, seq, path)
        faults    StorageFaults: damage at rest, a journal that refused records,
                  rot in a replica, the scrub
        roles     Roles: who may write a volume, promotion

    ``apply_lock`` keeps replica writes (applier, roll-back) and replica
    reads (``read_at``, scrub) apart; ``lock`` guards the volumes, hub.json
    and the window's pins; ``stop_event`` stops the applier and the storage
    watcher, ``closing`` long readers such as an export.

    Threads::

        open, start, close   main, or an offline command's (before and after the others)
        open_or_create, create_volume  conn-HOST:PORT (ATTACH of a new name); takes lock
        append_data          conn-HOST:PORT (WRITE, ZERO, READ_REPLY, EXTENTS, RWRITE)
        reads_as_zeroes      conn-HOST:PORT (a FULL sync's start); takes applier.applied_cond
        append_checkpoint    conn-HOST:PORT (CHECKPOINT), control-N, main (offline)
        volume, volume_by_id  any thread; takes lock
    """

    def __init__(self, data_dir: str, retention: float = DEFAULT_RETENTION,
                 max_bytes: int = DEFAULT_MAX_JOURNAL_BYTES,
                 segment_bytes: int = SEGMENT_BYTES):
        self.dir = os.path.abspath(data_dir)
        private_data_dir(self.dir)
        self.volumes_dir = os.path.join(self.dir, "volumes")
        self.health = Health()
        self.journal = Journal(os.path.join(self.dir, "journal"), segment_bytes, self.health)
        self.undo_log = SegmentLog(os.path.join(self.dir, "undo"), "undo log", segment_bytes)
        self.lock = threading.RLock()           # volumes dict, hub.json
        self.apply_lock = threading.Lock()      # replica contents vs read_at
        self.volumes: dict[str, Volume] = {}
        self.by_id: dict[int, Volume] = {}
        self.stop_event = threading.Event()   # the applier, the watcher: drain and stop
        self.closing = threading.Event()      # long readers (export): give up
        self.lock_fd: int | None = None
        self.hub_meta: dict = {}
        self.roles = Roles(self)
        self.applier = Applier(self)
        self.window = RecoveryWindow(self, retention, max_bytes)
        self.faults = StorageFaults(self)

    # -- opening -------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory, load everything, truncate torn tails (caller's thread)."""
        makedirs_private(self.volumes_dir)
        self.lock_fd = os.open(os.path.join(self.dir, LOCK_FILE), os.O_RDWR | os.O_CREAT,
                               PRIVATE_FILE)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(self.lock_fd)
            self.lock_fd = None
            raise StoreError(f"data directory {self.dir} is in use by another process "
                             "(a running hub?)") from err
        hub_path = os.path.join(self.dir, HUB_FILE)
        if os.path.exists(hub_path):
            self.hub_meta = read_json(hub_path)
        else:
            self.hub_meta = {"hub_id": f"hub-{secrets.token_hex(4)}", "next_volume_id": 1}
            atomic_write_json(hub_path, self.hub_meta)
        for name in sorted(os.listdir(self.volumes_dir)):
            meta_path = os.path.join(self.volumes_dir, name, "metadata.json")
            if not os.path.exists(meta_path):
                continue
            vol = Volume(os.path.join(self.volumes_dir, name), read_json(meta_path),
                         self.health)
            self.volumes[vol.name] = vol
            self.by_id[vol.id] = vol
        applied_path = os.path.join(self.dir, APPLIED_FILE)
        if os.path.exists(applied_path):
            self.applier.applied_seq = read_json(applied_path)["applied_seq"]
        applied = self.applier.applied_seq
        self.journal.open(start_seq=applied + 1)
        if self.journal.records and self.journal.first_seq > applied + 1:
            raise StoreError(f"journal starts at seq {self.journal.first_seq} but the "
                             f"replicas only have up to {applied}: records are missing")
        if self.journal.last_seq < applied:
            # The tail was torn off after... cannot happen: only durable records are applied.
            raise StoreError(f"replicas have seq {applied} applied but the journal "
                             f"ends at {self.journal.last_seq}")
        self._open_undo()
        self.faults.handle_damage()
        pending = self.journal.last_seq - applied
        log.info("store %s: %d volumes, journal seq %d..%d, applied %d (%d to replay)",
                 self.dir, len(self.volumes), self.journal.first_seq, self.journal.last_seq,
                 applied, pending)
        for rec in self.journal.records_between(applied, self.journal.last_seq,
                                                 len(self.journal.records)):
            self.applier.count_unapplied(rec)
        for vol in self.volumes.values():
            if any(not pr["rolled_back"] for pr in vol.meta.get("promotions", ())):
                log.warning("volume %s: its promotion was interrupted; rolling back again",
                            vol.name)
                self.window.roll_back(vol)

    def _open_undo(self) -> None:
        records = self.undo_log.open()
        # Undo records after the last UNDO_COMMIT belong to a batch whose replica
        # writes never started: drop them so the batch re-captures its undo.
        last_commit = max((i for i, r in enumerate(records) if r.kind == RecordKind.UNDO_COMMIT),
                          default=-1)
        if last_commit + 1 < len(records):
            cut = records[last_commit + 1]
            log.warning("undo log: %d records after the last commit are dropped (batch "
                        "interrupted before it touched a replica)", len(records) - last_commit - 1)
            for rec in records[last_commit + 1:]:
                if rec.segment != cut.segment:
                    self.undo_log.delete_segment(rec.segment)
            with open(self.undo_log.path(cut.segment), "r+b") as f:
                f.truncate(cut.pos - RECORD.size)
                os.fsync(f.fileno())
            self.undo_log.segment_sizes[cut.segment] = cut.pos - RECORD.size
            self.undo_log.close()
            self.undo_log = SegmentLog(self.undo_log.dir, "undo log", self.undo_log.segment_bytes)
            records = self.undo_log.open()
        for rec in records:
            if rec.kind == RecordKind.UNDO_COMMIT:
                self.applier.undo_committed_seq = rec.seq
            elif rec.kind == RecordKind.UNDO and rec.volume in self.by_id:
                vol = self.by_id[rec.volume]
                pr = vol.set_aside_of(rec.seq)
                if pr is None or not pr["rolled_back"]:  # a pending roll back needs it
                    vol.undo.append(rec)
        # Points older than an undo record lost to damage cannot be rebuilt.
        for damage in self.undo_log.damage:
            after = [r.seq for r in records if (r.segment, r.pos) > (damage["segment"],
                                                                      damage["start"])]
            floor = min(after, default=self.applier.applied_seq)
            if floor > self.window.undo_floor:
                self.window.undo_floor = floor
                log.error("undo log damage: points before seq %d can no longer be rebuilt "
                          "and leave the window", floor)

    def start(self) -> None:
        """Start the committer, the applier and the storage watcher threads."""
        self.journal.start()
        self.applier.start()
        self.faults.start()

    def close(self) -> None:
        """Make everything durable, stop the threads, unlock (the stopping thread)."""
        self.closing.set()
        self.journal.stop()
        self.stop_event.set()
        self.applier.stop()
        self.faults.stop()
        try:
            self.applier.persist(set(self.volumes.values()))
        except (OSError, JournalRefused) as err:
            log.error("replicas not made durable at close (%s); the next start replays "
                      "the journal from the last seq recorded as applied", err)
        self.journal.close()
        self.undo_log.close()
        for vol in self.volumes.values():
            vol.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    # -- volumes ---------------------------------------------------------------

    @property
    def hub_id(self) -> str:
        return self.hub_meta["hub_id"]

    def volume(self, name: str) -> Volume | None:
        with self.lock:
            return self.volumes.get(name)

    def volume_by_id(self, vid: int) -> Volume | None:
        with self.lock:
            return self.by_id.get(vid)

    def create_volume(self, name: str, size: int, chunk_size: int, owner: str,
                      generation: bytes) -> Volume:
        """Create ``DIR/volumes/<name>`` (name validated: one safe path component)."""
        p.validate_name(name, "volume name")
        path = os.path.join(self.volumes_dir, name)
        if os.path.dirname(os.path.abspath(path)) != self.volumes_dir:
            raise p.InvalidField(f"volume name {name!r} escapes the data directory",
                                 code=p.ErrorCode.BAD_NAME)
        with self.lock:
            if name in self.volumes:
                raise p.InvalidField(f"volume {name!r} exists")
            vid = self.hub_meta["next_volume_id"]
            self.hub_meta["next_volume_id"] = vid + 1
            atomic_write_json(os.path.join(self.dir, HUB_FILE), self.hub_meta)
            makedirs_private(path)
            fd = os.open(os.path.join(path, "replica"), os.O_RDWR | os.O_CREAT | os.O_TRUNC,
                         PRIVATE_FILE)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            meta = dict(name=name, id=vid, size=size, chunk_size=chunk_size, owner=owner,
                        generation=bytes(generation).hex(), state=VolState.INCONSISTENT.value,
                        full_synced=False, pending_plan=None,
                        applied_seq=self.applier.applied_seq, consistent_since_seq=None,
                        created_ns=time.time_ns())
            atomic_write_json(os.path.join(path, "metadata.json"), meta)
            fsync_dir(self.volumes_dir)
            vol = Volume(path, meta, self.health)
            self.volumes[name] = vol
            self.by_id[vid] = vol
        log.info("volume %s created: id=%d size=%d chunk=%d owner=%s", name, vid, size,
                 chunk_size, owner)
        return vol

    def open_or_create(self, name: str, size: int, chunk_size: int, owner: str,
                       generation: bytes) -> tuple[Volume, bool]:
        """The volume named ``name``, created for ``owner`` if new: (volume, created).

        Atomic, so two agents attaching a new name at once cannot both own it.
        A volume the hub's storage cannot create: JournalRefused."""
        with self.lock:
            vol = self.volumes.get(name)
            if vol is not None:
                return vol, False
            try:
                vol = self.create_volume(name, size, chunk_size, owner, generation)
            except OSError as err:
                self.health.fail(Fault.METADATA_IO, f"creating volume {name} failed: {err}")
                raise JournalRefused(f"hub cannot create volume {name}: {err}") from err
            self.health.clear(Fault.METADATA_IO)
            return vol, True

    # -- appending -------------------------------------------------------------

    def append_data(self, vol: Volume, offset: int, length: int, data, payload_crc=None,
                    flags: int = 0, recovery: bool = False,
                    sums: DataSums | None = None) -> Record:
        """Journal a WRITE (``data``, its ``sums`` if known) or ZERO (``data`` None)
        for ``vol``; not yet durable.

        ``Roles.check_writer`` decides under the journal lock whether the side
        writing (``recovery``: a FAILOVER session) may: ERROR(ROLE) for the
        protected side once the volume is promoted (RC-7), for the recovery
        side once a fail-back fenced it (FB-12); none slips in after either."""
        check = functools.partial(self.roles.check_writer, vol, recovery)
        if data is None:
            rec = self.journal.append(RecordKind.ZERO, vol.id, offset, length, flags=flags,
                                      check=check)
        else:
            rec = self.journal.append(RecordKind.WRITE, vol.id, offset, length, [data],
                                      payload_crc, flags, check=check, sums=sums)
        with self.applier.applied_cond:
            self.applier.count_unapplied(rec)
            if data is not None:
                vol.journaled_bytes += length
        return rec

    def reads_as_zeroes(self, vol: Volume) -> bool:
        """Whether ``vol``'s image (its replica with the journal applied) reads as
        zeroes everywhere: no record of it waits to be applied, and its replica
        holds no data extent (a file system that cannot tell holes from data
        reports data).  Only the recv loop of the connection ``vol`` is attached
        to journals for it, so from that loop the answer holds until it
        journals again."""
        with self.applier.applied_cond:
            if vol.unapplied_bytes:
                return False
        return next(data_extents(vol.fd, 0, vol.size), None) is None

    def append_checkpoint(self, agent: str, name: str) -> Record:
        """Journal a named point covering every volume of ``agent``; not yet durable."""
        p.validate_name(name, "checkpoint name")

        def unique():  # under the journal lock: two of one name cannot both pass
            for seq, _, owner, taken in self.journal.checkpoints:
                if owner == agent and taken == name:
                    raise p.InvalidField(f"checkpoint {name!r} of agent {agent} exists (seq "
                                         f"{seq}): a name names one point (CP-3)")

        return self.journal.append(RecordKind.CHECKPOINT, 0, 0, 0,
                                   [encode_checkpoint(agent, name)], check=unique)


# ---------------------------------------------------------------------------
# The applier


class Ranges:
    """Disjoint byte ranges, kept sorted: ``add`` takes one in O(log n) unless
    it overlaps one already in (the applier's test that a batch touches no
    byte twice, once per record).

    Threads::

        add                  applier (or the caller of apply_some offline)
    """

    def __init__(self):
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> bool:
        """Add [start, end) and return True, or return False if it overlaps."""
        i = bisect.bisect_right(self.starts, start)
        if i and self.ends[i - 1] > start or i < len(self.starts) and self.starts[i] < end:
            return False
        self.starts.insert(i, start)
        self.ends.insert(i, end)
        return True


class Applier:
    """The store's applier: durable journal records into the replicas, in journal order.

    It works in batches of records that do not overlap (APPLY_BATCH_RECORDS,
    APPLY_BATCH_BYTES): it captures each record's UNDO (the holes and data the
    record replaces), appends an UNDO_COMMIT and fdatasyncs the undo log, and
    only then writes the replicas, under the store's ``apply_lock``, noting
    their checksums (``ReplicaSums``).  ``applied_seq`` moves forward with each
    batch; ``persist`` makes the replicas and their checksums durable, then
    records it in ``applied.json``.  A write that fails marks the hub degraded
    (REPLICA_IO) and is retried.  About once a second it runs retention
    (``RecoveryWindow.trim``).  It also counts what each volume has journaled
    and not yet applied (``unapplied_bytes``, for status), under ``applied_cond``.

    Threads::

        start, stop          main (``VolumeStore.start``, ``close``)
        apply_some           applier; the caller's thread when no applier runs (offline)
        persist              applier; main (``VolumeStore.close``, ``replay``)
        replay               main (an offline command, before anything starts)
        count_unapplied      any thread, with applied_cond held; main (``VolumeStore.open``)
        wait_applied         any thread; waits on applied_cond
    """

    def __init__(self, store: VolumeStore):
        self.store = store
        self.journal = store.journal
        self.health = store.health
        self.applied_cond = threading.Condition(threading.Lock())
        self.applied_seq = 0          # the last journal seq the replicas hold
        self.undo_committed_seq = 0   # the last seq whose UNDO is durable (UNDO_COMMIT)
        self.waiters = 0              # threads in wait_applied: apply now, do not gather
        self.wake = threading.Event()  # look now: a reader waits, or the store stops
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None   # what stopped the thread, kept

    def start(self) -> None:
        self.thread = threading.Thread(target=self._apply_loop, name="applier", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Wake the thread (the store's ``stop_event`` is set) and join it."""
        self.wake.set()
        if self.thread:
            self.thread.join(timeout=60)
            if self.thread.is_alive():
                log.warning("applier did not stop within 60 s; replay will finish its work")

    def count_unapplied(self, rec: Record) -> None:
        """Count journaled ``rec`` as not yet in its volume's replica."""
        vol = self.store.by_id.get(rec.volume)
        if vol is not None:
            if not vol.unapplied_bytes:
                vol.unapplied_since_ns = rec.time_ns
            vol.unapplied_bytes += rec.length

    def _apply_loop(self) -> None:
        """Applier thread: durable journal records -> replicas, in journal order.

        A replica, undo or metadata write that fails marks the hub degraded
        (REPLICA_IO) and is retried with backoff from where it stopped: the
        records stay in the journal until they are applied."""
        background_priority()
        touched: set[Volume] = set()
        last_persist = time.monotonic()
        last_trim = 0.0
        retry = FAULT_RETRY_MIN
        try:
            while True:
                try:
                    batch = self.apply_some(touched)
                    now = time.monotonic()
                    if touched and (not batch or now - last_persist > APPLY_PERSIST_INTERVAL):
                        self.persist(touched)
                        touched = set()
                        last_persist = now
                    if now - last_trim > 1.0:
                        self.store.window.trim()
                        last_trim = now
                except (OSError, JournalRefused) as err:
                    self.health.fail(Fault.REPLICA_IO, f"applying the journal at seq "
                                     f"{self.applied_seq + 1} failed: {err}; retrying")
                    if getattr(err, "errno", None) in NO_SPACE:
                        self.journal.release_spares()
                    if self.store.stop_event.wait(retry):
                        return
                    retry = min(retry * 2, FAULT_RETRY_MAX)
                    continue
                retry = FAULT_RETRY_MIN
                self.health.clear(Fault.REPLICA_IO)
                if not batch:
                    if self.store.stop_event.is_set():
                        return
                    self.wake.clear()
                    if not self._apply_ready():
                        self.wake.wait(APPLY_POLL)
        except BaseException as err:  # keep the evidence; the journal still has everything
            self.error = err
            self.health.fail(Fault.REPLICA_IO, f"applier stopped: {err!r}; replicas stay "
                             "behind until the hub restarts")
            log.exception("applier stopped: %s; replicas stay behind until restart", err)

    def _apply_ready(self) -> bool:
        """Is a batch worth applying now (see APPLY_DELAY)?"""
        if self.journal.durable_seq <= self.applied_seq:
            return False
        if self.waiters or self.store.stop_event.is_set():
            return True
        first_time = self.journal.record_field(self.applied_seq + 1, "time_ns")
        if first_time is None or time.time_ns() - first_time >= APPLY_DELAY * 1e9:
            return True
        first_pos = self.journal.record_field(self.applied_seq + 1, "pos")
        last_pos = self.journal.record_field(self.journal.durable_seq, "pos")
        return last_pos is not None and last_pos - first_pos >= APPLY_BATCH_BYTES // 2

    def apply_some(self, touched: set | None = None, force: bool = False) -> list[Record]:
        """Apply one batch of durable records (applier thread, or offline callers)."""
        durable = self.journal.durable_seq
        if self.applied_seq >= durable or not (force or self._apply_ready()):
            return []
        records = self.journal.records_between(self.applied_seq, durable, APPLY_BATCH_RECORDS)
        batch: list[Record] = []
        ranges: dict[int, Ranges] = {}
        size = 0
        for rec in records:
            if rec.kind in (RecordKind.WRITE, RecordKind.ZERO):
                # Undo of a batch is captured before any of it is written, so a batch
                # never holds two records touching the same bytes.
                if not ranges.setdefault(rec.volume, Ranges()).add(rec.offset, rec.end):
                    break
                size += rec.payload_length
            batch.append(rec)
            if size >= APPLY_BATCH_BYTES:
                break
        self._apply_batch(batch, touched if touched is not None else set())
        return batch

    def _apply_batch(self, batch: list[Record], touched: set) -> None:
        new_undo: list[tuple[Volume, Record]] = []
        undo_log = self.store.undo_log
        if batch[-1].seq > self.undo_committed_seq:
            for rec in batch:
                vol = self.store.by_id.get(rec.volume)
                if (rec.kind in (RecordKind.WRITE, RecordKind.ZERO) and vol is not None
                        and rec.seq > self.undo_committed_seq
                        and vol.set_aside_of(rec.seq) is None):
                    parts = self._capture_undo(vol, rec.offset, rec.length)
                    urec = undo_log.append(rec.seq, RecordKind.UNDO, 0, rec.time_ns,
                                           vol.id, rec.offset, rec.length, parts)
                    new_undo.append((vol, urec))
            undo_log.append(batch[-1].seq, RecordKind.UNDO_COMMIT, 0, batch[-1].time_ns,
                            0, 0, 0, [])
            undo_log.do_sync(undo_log.take_sync_work())
            self.undo_committed_seq = batch[-1].seq
        with self.store.apply_lock:
            for rec in batch:
                vol = self.store.by_id.get(rec.volume)
                sums = self.journal.take_data_sums(rec.seq)
                if vol is not None and vol.set_aside_of(rec.seq) is not None:
                    pass  # set aside by a promotion: kept in the journal, never applied
                elif rec.kind == RecordKind.WRITE and vol is not None:
                    self.journal.log.copy_payload(rec, vol.fd, rec.offset)
                    vol.sums.note(vol.fd, rec.offset, rec.length, sums)
                elif rec.kind == RecordKind.ZERO and vol is not None:
                    write_zeroes(vol.fd, rec.offset, rec.length)
                    vol.sums.note_zeroes(vol.fd, rec.offset, rec.length)
                elif rec.kind in (RecordKind.WRITE, RecordKind.ZERO):
                    log.warning("journal seq %d names unknown volume id %d; skipped",
                                rec.seq, rec.volume)
                if vol is not None:
                    touched.add(vol)
            for vol, urec in new_undo:
                vol.undo.append(urec)
            with self.applied_cond:
                self.applied_seq = batch[-1].seq
                for rec in batch:
                    vol = self.store.by_id.get(rec.volume)
                    if vol is not None and rec.kind in (RecordKind.WRITE, RecordKind.ZERO):
                        vol.unapplied_bytes -= rec.length
                        if vol.unapplied_bytes <= 0:
                            vol.unapplied_bytes = 0
                            vol.unapplied_since_ns = 0
                        else:
                            vol.unapplied_since_ns = (
                                self.journal.record_field(rec.seq + 1, "time_ns") or 0)
                self.applied_cond.notify_all()
        self.journal.log.drop_cached(batch)

    def _capture_undo(self, vol: Volume, offset: int, length: int) -> list:
        """The UNDO payload for a range: its holes and data as they are now."""
        extents, datas = [], []
        pos, end = offset, offset + length
        for start, n in data_extents(vol.fd, offset, min(length, max(vol.size - offset, 0))):
            if start > pos:
                extents.append(UNDO_EXTENT.pack(pos - offset, start - pos, UNDO_HOLE))
            extents.append(UNDO_EXTENT.pack(start - offset, n, UNDO_DATA))
            datas.append(os.pread(vol.fd, n, start))
            pos = start + n
        if pos < end:
            extents.append(UNDO_EXTENT.pack(pos - offset, end - pos, UNDO_HOLE))
        return [UNDO_COUNT.pack(len(extents)), *extents, *datas]

    def persist(self, touched) -> None:
        """Make the replicas durable, then record how far they go (applier thread)."""
        for vol in touched:
            os.fdatasync(vol.fd)
            with self.store.apply_lock:
                vol.sums.flush()
        seq = self.applied_seq
        atomic_write_json(os.path.join(self.store.dir, APPLIED_FILE), {"applied_seq": seq})
        for vol in touched:
            vol.update(applied_seq=seq)

    def wait_applied(self, seq: int, timeout: float = 60.0) -> None:
        """Block until the replicas hold every record up to ``seq``.  Wakes the
        applier, which takes a durable ``seq`` at once; commits do not wake it,
        so wait for ``seq`` to be durable first (``Journal.wait_durable``), or
        pay up to APPLY_POLL more."""
        deadline = time.monotonic() + timeout
        with self.applied_cond:
            self.waiters += 1
        try:
            self.wake.set()
            with self.applied_cond:
                while self.applied_seq < seq:
                    if self.thread is None or not self.thread.is_alive():
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise p.RequestError(f"replicas did not reach seq {seq} within "
                                             f"{timeout:.0f} s", code=p.ErrorCode.BUSY)
                    self.applied_cond.wait(min(remaining, 0.5))
        finally:
            with self.applied_cond:
                self.waiters -= 1
        if self.applied_seq < seq:  # offline: apply in this thread
            while self.applied_seq < seq and self.apply_some(force=True):
                pass
        if self.applied_seq < seq:
            raise p.RequestError(f"replicas stop at seq {self.applied_seq}, wanted {seq}",
                                 code=p.ErrorCode.IO_ERROR)

    def replay(self) -> None:
        """Offline: apply everything journaled (the caller's thread)."""
        while self.apply_some(force=True):
            pass
        self.persist(set(self.store.volumes.values()))


# ---------------------------------------------------------------------------
# The recovery window


class RecoveryWindow:
    """The store's recovery window: the points in time its volumes can be read at.

    A point is a seq: every volume as it was right after that record.  The
    window runs from ``oldest_seq`` (what retention, ``trim``, has kept, and
    no older than undo lost to damage at rest) to the newest durable record.
    Inside it ``seq_problem`` refuses the points where a volume was not
    crash-consistent: before its first full sync, and inside a resync
    (``resync_begins``, ``resync_ends``).  ``resolve_point`` turns a point's
    name into its seq; ``read_at`` rebuilds a range at a seq: the replica,
    checked against its checksums, with the undo records newer than the seq
    laid over it, newest first.  ``pin`` keeps a seq inside the window while a
    session reads at it.  The data side of a promotion is here too:
    ``roll_back`` writes the state at the promotion's point back into the
    replica, and ``export_set_aside`` exports the history it set aside.

    Threads::

        trim                 applier
        read_at              any thread; takes the store's apply_lock
        export, export_set_aside  control-N (``rephub.py export``), or main offline
        roll_back            control-N or conn-HOST:PORT (a promotion), main (at open)
        resync_begins, resync_ends  any thread; writes metadata.json
        pin, pin_floor       any thread; takes the store's lock
        *                    any thread
    """

    def __init__(self, store: VolumeStore, retention: float, max_bytes: int):
        self.store = store
        self.journal = store.journal
        self.retention = retention
        self.max_bytes = max_bytes
        self.undo_floor = 0      # points before it lost their undo to damage at rest
        self.undo_tables: dict[tuple[int, int], list] = {}   # an UNDO's extents, parsed
        self.pins: collections.Counter = collections.Counter()  # seq -> sessions reading it

    # -- retention ---------------------------------------------------------------

    def trim(self) -> None:
        """Drop journal segments out of the window, and the undo they no longer need."""
        j = self.journal
        segments = j.log.segments()
        now = time.time_ns()
        floor = self.pin_floor()  # recovery sessions, kept set-aside entries
        applied = self.store.applier.applied_seq
        for seg, nxt in zip(segments, segments[1:]):
            if nxt - 1 > applied or (floor is not None and nxt - 1 > floor):
                break
            last = j.record(nxt - 1)
            too_old = last is not None and now - last.time_ns > self.retention * 1e9
            too_big = j.log.total_bytes() + self.store.undo_log.total_bytes() > self.max_bytes
            if not (too_old or too_big):
                break
            j.drop_segment(seg, nxt)
            log.info("journal segment %d dropped (%s); window now starts after seq %d",
                     seg, "older than retention" if too_old else "over --journal-max-bytes",
                     nxt - 1)
        oldest = self.oldest_seq()
        usegs = self.store.undo_log.segments()
        for seg, nxt in zip(usegs, usegs[1:]):
            if nxt > oldest:
                break
            with self.store.apply_lock:
                for vol in self.store.volumes.values():
                    del vol.undo[vol.undo.span("segment", seg, seg)]
                self.store.undo_log.delete_segment(seg)
            self.undo_tables = {k: v for k, v in self.undo_tables.items() if k[0] != seg}

    def oldest_seq(self) -> int:
        """The oldest seq the volumes can be read at."""
        return max(self.journal.first_seq - 1, self.undo_floor)

    # -- points in time ------------------------------------------------------------

    def points(self, vol: Volume) -> dict:
        """The window, the recoverable checkpoints of ``vol``'s agent inside it,
        the checkpoints that cannot be recovered (and why), resyncs, promotions."""
        j = self.journal
        first = j.record(j.first_seq)
        last = j.record(j.last_seq)
        cps, bad = [], []
        for seq, t, agent, name in list(j.checkpoints):
            if agent != vol.owner:
                continue
            cp = dict(name=name, seq=seq, time_ns=t, time=fmt_time_ns(t))
            pr = vol.set_aside_of(seq)
            why = (f"set aside by the promotion at {pr['point']!r}" if pr
                   else self.seq_problem(vol, seq))
            if why:
                bad.append(dict(cp, reason=why, set_aside=pr is not None))
            else:
                cps.append(cp)
        promos = [dict(pr, time=fmt_time_ns(pr["time_ns"]))
                  for pr in vol.meta.get("promotions", [])]
        try:
            seq, _ = self.resolve_point(vol, "latest")
            latest = dict(seq=seq, reason=None)
        except p.RequestError as err:
            latest = dict(seq=None, reason=str(err))
        return dict(volume=vol.name, owner=vol.owner, state=vol.state.value, latest=latest,
                    role=vol.role.value,
                    oldest=dict(seq=first.seq, time_ns=first.time_ns,
                                time=fmt_time_ns(first.time_ns)) if first else None,
                    newest=dict(seq=last.seq, time_ns=last.time_ns,
                                time=fmt_time_ns(last.time_ns)) if last else None,
                    checkpoints=cps, unrecoverable=bad,
                    resyncs=[dict(after_seq=lo, consistent_from_seq=hi)
                             for lo, hi in vol.meta.get("resyncs", [])],
                    promotions=promos)

    def resolve_point(self, vol: Volume, point: str, set_aside: bool = False) -> tuple[int, int]:
        """(seq, time_ns) of a point: "latest", a checkpoint name, or an RFC 3339
        UTC time (``protocol.parse_point_time``: the newest record not after it).

        Refuses points outside the window, before the first full sync, inside a
        resync (not crash-consistent), and checkpoints set aside by a promotion
        (unless ``set_aside``: then only those, for exporting the old history).
        A time or ``latest`` inside a set-aside range is the promotion point:
        that is what the volume's new history holds there.
        """
        j = self.journal
        if vol.state == VolState.INCONSISTENT:
            raise p.RequestError(f"volume {vol.name} is {vol.state.value}, not consistent: "
                                 "no point of it can be recovered yet",
                                 code=p.ErrorCode.INCONSISTENT)
        named = False
        if point == "latest":
            seq = j.durable_seq
            spans = vol.meta.get("resyncs", ())
            if spans and spans[-1][1] is None:  # even with nothing journaled since it began
                lo = spans[-1][0]
                rec = j.record(lo)
                raise p.RequestError(
                    f"volume {vol.name} is resyncing: 'latest' is not crash-consistent until "
                    f"the resync ends; the newest consistent point is seq {lo}"
                    + (f" ({fmt_time_ns(rec.time_ns)}): name it by that time" if rec else ""),
                    code=p.ErrorCode.INCONSISTENT)
        else:
            cps = [c for c in list(j.checkpoints) if c[2] == vol.owner and c[3] == point]
            if cps:
                seq, named = cps[-1][0], True
            else:
                try:
                    t_ns = p.parse_point_time(point)   # RC-8: the one grammar
                except ValueError as err:
                    raise PointError(f"point {err}") from None
                if t_ns is None:
                    raise PointError(f"point {point!r} is not 'latest', a checkpoint of "
                                     f"agent {vol.owner} in the window, or an RFC 3339 UTC "
                                     f"time such as {POINT_EXAMPLE}")
                seq = j.seq_at_time(t_ns)
                if seq is None:
                    oldest = j.record(j.first_seq)
                    raise PointError(f"point {point} is before the journal window (oldest "
                                     f"{fmt_time_ns(oldest.time_ns) if oldest else 'none'})")
        if seq < self.oldest_seq():
            raise PointError(f"point {point!r} (seq {seq}) is outside the journal window "
                             f"(oldest seq {self.oldest_seq()})")
        pr = vol.set_aside_of(seq)
        if set_aside and pr is None:
            raise PointError(f"point {point!r} (seq {seq}) of volume {vol.name} is not in a "
                             "range set aside by a promotion")
        if pr is not None and not set_aside:
            if named:
                raise PointError(f"checkpoint {point!r} (seq {seq}) of volume {vol.name} was "
                                 f"set aside by the promotion at {pr['point']!r} (seq "
                                 f"{pr['point_seq']}); export it with --set-aside")
            seq = pr["point_seq"]
        why = self.seq_problem(vol, seq)
        if why:
            raise p.RequestError(f"point {point!r} (seq {seq}) of volume {vol.name} is {why}",
                                 code=p.ErrorCode.BAD_POINT if "window" in why
                                 else p.ErrorCode.INCONSISTENT)
        rec = j.record(seq)
        return seq, (rec.time_ns if rec else 0)

    def read_at(self, vol: Volume, seq: int, offset: int, length: int,
                check: bool = True) -> memoryview | None:
        """The bytes of ``vol`` right after journal record ``seq``; None if all zero.
        As ``read_summed``, without the CRC."""
        return self.read_summed(vol, seq, offset, length, check)[0]

    def read_summed(self, vol: Volume, seq: int, offset: int, length: int,
                    check: bool = True) -> tuple[memoryview | None, int | None]:
        """The bytes of ``vol`` right after journal record ``seq`` (None if all
        zero), and their CRC-32 when the checksum check gave it for free (else
        None): a reply sends it as its payload_crc instead of a second pass.

        Waits for the applier to reach ``seq``; raises PointError when the
        window no longer covers ``seq``.  The replica's bytes are checked
        against its checksums (the whole chunks the range touches): a
        mismatch is ReplicaDamaged, never returned (``check`` False: a verify,
        which compares with the agent itself).  Where no undo record applies
        the answer is a view of the bytes the replica's pread returned, not a
        copy; otherwise a view of a copy with the undo laid over it.
        """
        p.check_range(offset, length, vol.size, "read")
        if seq > self.journal.durable_seq and not self.journal.wait_durable(seq, timeout=60):
            raise p.RequestError(f"journal did not become durable up to seq {seq}",
                                 code=p.ErrorCode.IO_ERROR)
        self.store.applier.wait_applied(seq)
        with self.store.apply_lock:
            if seq < self.oldest_seq():
                raise PointError(f"seq {seq} left the journal window "
                                 f"(oldest {self.oldest_seq()})")
            end = offset + length
            # The undo newer than seq that overlaps the range, newest first;
            # scanned by column, a Record made only for what overlaps.
            undo = vol.undo
            first = bisect.bisect_right(undo.column("seq"), seq)
            offs, lens = undo.column("offset"), undo.column("length")
            undos = [undo[i] for i in range(len(undo) - 1, first - 1, -1)
                     if offs[i] < end and offset < offs[i] + lens[i]]
            has_data = next(data_extents(vol.fd, offset, length), None) is not None
            if not has_data and not undos:
                return None, None
            view, damaged, crc = (self._read_replica(vol, offset, length, check) if has_data
                                  else (memoryview(b""), [], None))
            if undos or len(view) < length:   # a copy to lay the undo over, or a short read
                buf = bytearray(length)
                buf[:len(view)] = view
                for u in undos:  # newest first: each restores what was there before it
                    self._overlay_undo(u, buf, offset, end)
                view, crc = memoryview(buf), None
        if damaged:   # reported outside the apply lock: it writes metadata, starts a verify
            self.store.faults.replica_damaged(vol, damaged)
            raise ReplicaDamaged(vol.name, damaged)
        return (None, None) if is_zero_buffer(view) else (view, crc)

    @staticmethod
    def _read_replica(vol: Volume, offset: int, length: int,
                      check: bool) -> tuple[memoryview, list[int], int | None]:
        """The replica's bytes of a range, a view of one pread (shorter if the
        file is); with ``check`` the chunks whose checksum they fail and the
        range's CRC-32, from the chunks' (None without ``check``)."""
        if not check:
            return memoryview(os.pread(vol.fd, length, offset)), [], None
        end = offset + length
        lo = offset // CHECK_CHUNK * CHECK_CHUNK
        got = os.pread(vol.fd, min(-(-end // CHECK_CHUNK) * CHECK_CHUNK, vol.size) - lo, lo)
        bad, sums = vol.sums.check(got, lo // CHECK_CHUNK)
        crc = range_crc(got, sums, offset - lo, end - lo)
        return memoryview(got)[offset - lo:end - lo], bad, crc

    def _overlay_undo(self, u: Record, buf: bytearray, offset: int, end: int) -> None:
        table = self.undo_tables.get((u.segment, u.pos))
        if table is None:
            head = self.store.undo_log.read_payload(dataclasses.replace(
                u, payload_length=min(u.payload_length, UNDO_COUNT.size)))
            (count,) = UNDO_COUNT.unpack(head)
            raw = self.store.undo_log.read_payload(dataclasses.replace(
                u, payload_length=UNDO_COUNT.size + count * UNDO_EXTENT.size))
            table, data_pos = [], u.pos + UNDO_COUNT.size + count * UNDO_EXTENT.size
            for rel, n, kind in UNDO_EXTENT.iter_unpack(raw[UNDO_COUNT.size:]):
                table.append((u.offset + rel, n, kind, data_pos))
                if kind == UNDO_DATA:
                    data_pos += n
            self.undo_tables[(u.segment, u.pos)] = table
        for start, n, kind, dpos in table:
            lo, hi = max(start, offset), min(start + n, end)
            if lo >= hi:
                continue
            if kind == UNDO_HOLE:
                buf[lo - offset:hi - offset] = bytes(hi - lo)
            else:
                piece = self.store.undo_log.read_payload(dataclasses.replace(
                    u, pos=dpos + (lo - start), payload_length=hi - lo))
                buf[lo - offset:hi - offset] = piece

    def export(self, vol: Volume, seq: int, out_path: str, progress=None) -> int:
        """Write ``vol`` as of ``seq`` to a sparse raw file; return the data bytes written."""
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
        written = 0
        try:
            os.ftruncate(fd, vol.size)
            for off in range(0, vol.size, IO_BLOCK):
                if self.store.closing.is_set():
                    raise p.RequestError("the hub is stopping; export abandoned",
                                         code=p.ErrorCode.SHUTTING_DOWN)
                n = min(IO_BLOCK, vol.size - off)
                data = self.read_at(vol, seq, off, n)
                if data is not None:
                    os.pwrite(fd, data, off)
                    written += n
                if progress:
                    progress(off + n, vol.size)
            os.fsync(fd)
        finally:
            os.close(fd)
        return written

    # -- recovery: resync intervals, pins, rolling back a promotion -------------------

    def resync_begins(self, vol: Volume) -> bool:
        """A DIRTY/VERIFY resync of a consistent volume starts: points after the
        last record journaled so far are not crash-consistent until it ends.
        False if one had begun already and not ended."""
        spans = [list(s) for s in vol.meta.get("resyncs", [])]
        if spans and spans[-1][1] is None:
            return False
        spans.append([self.journal.last_seq, None])
        vol.update(resyncs=spans)
        return True

    def resync_ends(self, vol: Volume) -> None:
        """The resync completed: the state after the last record journaled is consistent."""
        spans = [list(s) for s in vol.meta.get("resyncs", [])]
        if spans and spans[-1][1] is None:
            spans[-1][1] = max(self.journal.last_seq, spans[-1][0] + 1)
            vol.update(resyncs=spans)

    def seq_problem(self, vol: Volume, seq: int) -> str | None:
        """Why the state of ``vol`` right after ``seq`` cannot be recovered, or None."""
        if seq < self.oldest_seq():
            return f"outside the journal window (oldest seq {self.oldest_seq()})"
        since = vol.meta.get("consistent_since_seq")
        if since is None or seq < since:
            return f"before the volume's first full sync completed (seq {since})"
        for lo, hi in vol.meta.get("resyncs", ()):
            if lo < seq and (hi is None or seq < hi):
                rec = self.journal.record(lo)
                newest = (f"; the newest consistent point before it is seq {lo}"
                          + (f" ({fmt_time_ns(rec.time_ns)})" if rec else "")
                          if lo >= max(self.oldest_seq(), since) else "")
                return (f"inside a resync (seq {lo + 1}..{'now' if hi is None else hi - 1}), "
                        "where the replica was a mix of old and new data: not crash-consistent"
                        + newest)
        return None

    def pin(self, seq: int, delta: int = 1) -> None:
        """Keep ``seq`` inside the window while a session reads at it."""
        with self.store.lock:
            self.pins[seq] += delta
            if self.pins[seq] <= 0:
                del self.pins[seq]

    def pin_floor(self) -> int | None:
        """The oldest seq that retention must keep readable (sessions, set-aside
        entries the operator has not released, and while a volume is promoted
        every record since its promotion: a fail-back sends their regions)."""
        with self.store.lock:
            seqs = list(self.pins)
            for vol in self.store.volumes.values():
                seqs += [pr["point_seq"] for pr in vol.meta.get("promotions", ())
                         if pr.get("kept", True)]
                if vol.role is Role.PROMOTED:
                    seqs += [pr["point_seq"] for pr in vol.current_promotions()]
        return min(seqs) if seqs else None

    def roll_back(self, vol: Volume) -> None:
        """Write the state at each pending promotion's point back into the replica."""
        promos = [dict(pr) for pr in vol.meta.get("promotions", [])]
        for pr in promos:
            if pr["rolled_back"]:
                continue
            lo, hi = pr["set_aside_from"], pr["set_aside_to"]
            with self.store.apply_lock:
                merged = merge_ranges((u.offset, u.end)
                                      for u in vol.undo[vol.undo.span("seq", lo, hi)])
            done = 0
            for start, end in merged:
                for off in range(start, end, IO_BLOCK):
                    n = min(IO_BLOCK, end - off)
                    data = self.read_at(vol, pr["point_seq"], off, n)
                    with self.store.apply_lock:
                        if data is None:
                            write_zeroes(vol.fd, off, n)
                            vol.sums.note_zeroes(vol.fd, off, n)
                        else:
                            os.pwrite(vol.fd, data, off)
                            vol.sums.note(vol.fd, off, n)
                    done += n
            os.fdatasync(vol.fd)
            with self.store.apply_lock:
                vol.sums.flush()
            with self.store.apply_lock:
                del vol.undo[vol.undo.span("seq", lo, hi)]
            pr["rolled_back"] = True
            vol.update(promotions=promos, state=VolState.CONSISTENT.value, pending_plan=None)
            log.info("volume %s rolled back to seq %d (%s rewritten)", vol.name,
                     pr["point_seq"], fmt_bytes(done))

    def export_set_aside(self, vol: Volume, seq: int, out_path: str, progress=None) -> int:
        """Export the old history at a set-aside ``seq``: the promotion point, then
        the volume's set-aside journal records up to ``seq`` replayed on top."""
        pr = vol.set_aside_of(seq)
        written = self.export(vol, pr["point_seq"], out_path, progress)
        fd = os.open(out_path, os.O_WRONLY)
        try:
            after = pr["point_seq"]
            while after < seq:
                recs = self.journal.records_between(after, seq, 1024)
                if not recs:
                    raise PointError(f"set-aside journal records after seq {after} are gone")
                for rec in recs:
                    if rec.volume == vol.id and rec.kind == RecordKind.WRITE:
                        os.pwrite(fd, self.journal.log.read_payload(rec), rec.offset)
                    elif rec.volume == vol.id and rec.kind == RecordKind.ZERO:
                        write_zeroes(fd, rec.offset, rec.length)
                after = recs[-1].seq
            os.fsync(fd)
        finally:
            os.close(fd)
        return written


# ---------------------------------------------------------------------------
# Storage faults


class StorageFaults:
    """The store's fault handling: damage at rest, a journal that refused
    records, and rot in a replica (PROTOCOL.md RP-10, RP-11).

    ``handle_damage`` runs at open, on the damage the journal and undo log
    scans found: each volume a lost record may have touched owes a VERIFY
    against its agent, and the damaged segment is copied to quarantine.  The
    storage watcher thread polls with backoff while the journal refuses
    records (disk full, I/O error); once the disk has room, ``try_reopen``
    lets the journal take records again and calls ``on_reopened`` (the hub
    ends each refused connection with GOODBYE).  ``writable`` says whether
    the store takes records and metadata now.  When a replica read or the
    ``scrub`` finds a chunk whose checksum differs, ``replica_damaged`` makes
    the volume owe a VERIFY, refuses its points from then until the VERIFY
    ends, and calls ``on_damaged`` (the hub starts the VERIFY now if the
    volume's agent is attached).

    Threads::

        handle_damage        main (``VolumeStore.open``, before any thread starts)
        start, stop          main (``VolumeStore.start``, ``close``)
        try_reopen           storage-watch
        scrub                scrub; takes the store's apply_lock
        replica_damaged      any thread (a ``read_at``, or scrub); writes metadata.json
        writable             any thread
    """

    def __init__(self, store: VolumeStore):
        self.store = store
        self.journal = store.journal
        self.health = store.health
        self.on_reopened = None   # the hub's callback: resync what was refused
        self.on_damaged = None    # the hub's callback: verify a volume with rot
        self.watcher: threading.Thread | None = None

    def start(self) -> None:
        self.watcher = threading.Thread(target=self._watch_loop, name="storage-watch",
                                        daemon=True)
        self.watcher.start()

    def stop(self) -> None:
        """Join the watcher (the store's ``stop_event`` is set)."""
        if self.watcher:
            self.watcher.join(timeout=5)

    def handle_damage(self) -> None:
        """Damage at rest found by the scans (SegmentLog._damaged), first seen now:
        each volume a lost journal record may have touched is verified against
        its agent at the next ATTACH, and if the replica never got the record,
        its points from there until that verify ends are not offered.  Then
        the segment is copied aside, which marks the damage as handled."""
        for damage in self.journal.log.damage:
            if not damage["new"]:
                continue
            lost = [(seq, vid) for seq, vid, d in self.journal.lost if d is damage]
            if any(vid is None for _, vid in lost) or not lost:
                touched = list(self.store.volumes.values())
            else:
                touched = [self.store.by_id[vid] for _, vid in lost if vid in self.store.by_id]
            first = min((seq for seq, _ in lost), default=self.journal.last_seq + 1)
            for vol in touched:
                if not vol.meta["full_synced"]:
                    continue   # its FULL sync is still owed anyway
                spans = [list(x) for x in vol.meta.get("resyncs", [])]
                if first > self.store.applier.applied_seq and not (spans and spans[-1][1] is None):
                    spans.append([first - 1, None])
                vol.update(state=VolState.SYNCING.value, pending_plan="VERIFY", resyncs=spans)
                log.error("volume %s: journal damage may have lost its record(s) %s; it is "
                          "verified against its agent at the next ATTACH", vol.name,
                          ", ".join(str(seq) for seq, _ in lost) or "(none known)")
            self.journal.log.quarantine(damage)
        for damage in self.store.undo_log.damage:
            if damage["new"]:
                self.store.undo_log.quarantine(damage)

    def _watch_loop(self) -> None:
        """Storage watcher thread: reopen a journal that refused records, once its
        file system has room again (polled with backoff)."""
        retry = FAULT_RETRY_MIN
        while not self.store.stop_event.wait(retry):
            if self.writable() or self.journal.failed:
                retry = FAULT_RETRY_MIN
                continue
            retry = min(retry * 2, FAULT_RETRY_MAX)
            if self.try_reopen():
                retry = FAULT_RETRY_MIN

    def writable(self) -> bool:
        """Can the store take records and metadata now?"""
        return (self.health.journal_fault() is None and not self.journal.failed
                and not self.health.active(Fault.METADATA_IO))

    def try_reopen(self) -> bool:
        """Take records and metadata again if the disk has room and the journal's
        last segment ends with a whole record (watcher thread).  A write that
        still fails marks the store degraded again."""
        st = os.statvfs(self.journal.log.dir)
        free = st.f_bavail * st.f_frsize
        needed = min(RESUME_FREE_BYTES, st.f_blocks * st.f_frsize // 16)
        if free < needed and self.journal.release_spares():
            st = os.statvfs(self.journal.log.dir)
            free = st.f_bavail * st.f_frsize
        if free < needed:
            log.debug("storage still full: %s free, %s needed", fmt_bytes(free),
                      fmt_bytes(needed))
            return False
        try:
            self.journal.resume()
        except OSError as err:
            log.debug("journal segment still cannot be cut back: %s", err)
            return False
        for volume in self.health.active(Fault.METADATA_IO):
            self.health.clear(Fault.METADATA_IO, volume)
        if self.on_reopened is not None:
            self.on_reopened()
        return True

    # -- rot at rest: checksums and the scrub -----------------------------------------

    def replica_damaged(self, vol: Volume, chunks: list[int]) -> None:
        """Rot found in ``vol``'s replica (a read or the scrub; any thread): the
        volume owes a VERIFY against its agent, which rewrites what differs;
        until it ends no point after now is offered, and reads of the damaged
        chunks fail rather than return rot."""
        self.health.fail(Fault.REPLICA_DAMAGED, f"{len(chunks)} chunk(s) of {CHECK_CHUNK} "
                         f"bytes fail their checksum, first at byte {chunks[0] * CHECK_CHUNK}",
                         vol.name)
        if vol.meta["full_synced"] and vol.meta.get("pending_plan") != "VERIFY":
            try:
                self.store.window.resync_begins(vol)
                vol.update(state=VolState.SYNCING.value, pending_plan="VERIFY")
            except JournalRefused as err:
                log.error("volume %s: cannot record that it needs a verify: %s", vol.name, err)
        if self.on_damaged is not None:
            self.on_damaged(vol)

    def scrub(self, vol: Volume, rate: RateLimiter, stop: threading.Event) -> dict:
        """Read the whole replica and check it against its checksums (scrub thread)."""
        started, bad = time.monotonic(), []
        for off in range(0, vol.size, IO_BLOCK):
            if stop.is_set():
                break
            n = min(IO_BLOCK, vol.size - off)
            rate.acquire(n, stop)
            with self.store.apply_lock:
                if next(data_extents(vol.fd, off, n), None) is None:
                    continue
                bad += vol.sums.bad_chunks(os.pread(vol.fd, n, off), off // CHECK_CHUNK)
        if bad:
            self.replica_damaged(vol, bad)
        result = dict(volume=vol.name, time=fmt_time_ns(time.time_ns()), damaged_chunks=len(bad),
                      seconds=round(time.monotonic() - started, 3), complete=not stop.is_set())
        log.log(logging.ERROR if bad else logging.INFO, "scrub of %s: %s in %.1f s", vol.name,
                f"{len(bad)} damaged chunks" if bad else "no damage", result["seconds"])
        return result


# ---------------------------------------------------------------------------
# Roles: who may write a volume, and promotion (PROTOCOL.md RC-6, RC-7, FB-12)


class Roles:
    """The role policy over the store: which side may write a volume's replica.

    A PROTECTED volume takes its agent's stream; promoting it at a point hands
    it to the recovery site, after which the protected side's writes are
    refused with ERROR(ROLE) (RC-7) and a FAILOVER session's writes are taken
    until a fail-back fences them (FB-12).  Both refusals are decided by
    ``check_writer``, which ``VolumeStore.append_data`` runs under the
    journal's append lock: a change made with ``Journal.fence`` holds for
    every record after the seq it returns.  A fail-back gives the volume back
    (``Failback``, which sets the role to PROTECTED).

    Threads::

        check_writer               conn-HOST:PORT, under Journal.lock (the journal's check)
        promote                    control-N, or conn-HOST:PORT (a FAILOVER session opens)
        release_set_aside          control-N
    """

    def __init__(self, store: VolumeStore):
        self.store = store

    @staticmethod
    def check_writer(vol: Volume, recovery: bool) -> None:
        """Under the journal lock: refuse a write of the side that does not own
        ``vol`` (``recovery``: a FAILOVER session's write) with ROLE."""
        if recovery:
            fb = vol.failback
            if fb is not None and fb.fenced:
                raise p.RequestError(f"volume {vol.name} is failing back to agent {fb.agent}",
                                     code=p.ErrorCode.ROLE)
            return
        pr = vol.promoting
        if pr is None and vol.role is Role.PROMOTED:
            pr = vol.meta.get("promotions", [{}])[-1]
        if pr is not None:
            raise p.RequestError(f"volume {vol.name} was promoted at {pr.get('point')!r} "
                                 f"({fmt_time_ns(pr.get('time_ns'))}): the recovery site owns "
                                 "it now and writes from the protected side are refused",
                                 code=p.ErrorCode.ROLE)

    def promote(self, vol: Volume, seq: int, point: str) -> dict:
        """Make ``vol`` at ``seq`` the start of its new history (RC-6, RC-7).

        The promotion is decided under the journal's append lock (``fence``):
        no protected write is journaled after ``last``, the seq it returns.
        Journal entries of ``vol`` after ``seq`` up to ``last`` are set aside:
        kept in the journal and exportable, never applied again.  The decision
        is then persisted in the volume's metadata (an fsync, outside the
        lock; protected writes are refused meanwhile, and kept marked by the
        agent if the promotion fails), and the replica is rolled back to
        ``seq``.  A crash after the metadata is written redoes the roll back
        at the next open (it is idempotent)."""
        store, j = self.store, self.store.journal
        pr = dict(point=point, point_seq=seq, set_aside_from=seq + 1,
                  time_ns=time.time_ns(), rolled_back=False, kept=True)

        def decide():
            vol.promoting = pr
        last = j.fence(decide)
        try:
            pr["set_aside_to"] = last
            promos = [dict(x) for x in vol.meta.get("promotions", [])]
            spans = [[lo, last if hi is None else hi] for lo, hi in vol.meta.get("resyncs", [])]
            vol.update(role=Role.PROMOTED.value, promotions=promos + [pr], resyncs=spans)
        finally:
            vol.promoting = None   # refused from here on by the persisted role
        log.info("volume %s promoted at %r (seq %d); %s", vol.name, point, seq,
                 f"its journal entries {seq + 1}..{last} are set aside" if last > seq
                 else "no newer journal entry to set aside")
        if not j.wait_durable(last, timeout=60):
            raise p.RequestError("journal not durable", code=p.ErrorCode.IO_ERROR)
        store.applier.wait_applied(last)
        store.window.roll_back(vol)
        return dict(volume=vol.name, point=point, seq=seq, set_aside_from=seq + 1,
                    set_aside_to=last, time=fmt_time_ns(pr["time_ns"]))

    @staticmethod
    def release_set_aside(vol: Volume) -> int:
        """The operator gives up the set-aside entries: retention may drop them."""
        promos = [dict(pr, kept=False) for pr in vol.meta.get("promotions", [])]
        vol.update(promotions=promos)
        return len(promos)


# ---------------------------------------------------------------------------
# Sync control (docs/SEMANTICS.md "Sync": the hub drives it)


class JobStopped(Exception):
    pass


def split_extents(offset: int, extents, chunk: int, size: int) -> tuple[int, list, list]:
    """An EXTENTS answer from ``offset`` on a volume of ``size`` -> (end, zero
    ranges, data ranges).

    Data runs are widened to whole chunks (what READ pieces cover); zero
    ranges are the rest.  ``end`` is where the answer's use stops: its end,
    cut back to a chunk boundary when that leaves something, so the next
    query starts aligned.  Ranges are (offset, length), sorted, disjoint.
    """
    end = offset + sum(n for n, _ in extents)
    if end < size and end % chunk and end - end % chunk > offset:
        end -= end % chunk
    data: list[list[int]] = []
    pos = offset
    for n, flags in extents:
        start, stop = pos, min(pos + n, end)
        pos += n
        if start >= end:
            break
        if flags & p.EXTENT_ZERO:
            continue
        start = max(offset, start - start % chunk)
        stop = min(end, -(-stop // chunk) * chunk)
        if data and data[-1][1] >= start:
            data[-1][1] = max(data[-1][1], stop)
        else:
            data.append([start, stop])
    zeros, pos = [], offset
    for start, stop in data:
        if start > pos:
            zeros.append((pos, start - pos))
        pos = stop
    if pos < end:
        zeros.append((pos, end - pos))
    return end, zeros, [(a, b - a) for a, b in data]


def query_checksums(conn: AgentConnection, vol: Volume, chunk: int, ask, take):
    """CHECKSUM_QUERY the whole of ``vol`` in ranges of VERIFY_CHUNKS_PER_QUERY
    chunks, VERIFY_WINDOW in flight (``ask`` and ``take`` as for ``pipelined``,
    but ``ask`` takes the request); yield each CHECKSUMS and its context."""
    span = chunk * VERIFY_CHUNKS_PER_QUERY
    todo = collections.deque((off, min(span, vol.size - off))
                             for off in range(0, vol.size, span))

    def query(off: int, n: int) -> int:
        return ask(p.ChecksumQuery(request_id=conn.requests.new_id(), volume=vol.id,
                                   offset=off, length=n, chunk_size=chunk))
    for _, msg, context in pipelined(todo, VERIFY_WINDOW, query, take):
        yield msg, context


@functools.lru_cache(maxsize=8)
def zero_digest(length: int) -> bytes:
    """SHA-256 of ``length`` zero bytes: a chunk the hub holds as a hole."""
    return hashlib.sha256(bytes(length)).digest()


def compare_digests(msg: p.Checksums, data) -> tuple[list, list]:
    """The chunks of a CHECKSUMS answer whose digests equal those of ``data``
    (the hub's bytes of the answer's range; None: zeroes), and those that
    differ: (same, differ), (offset, length) runs with adjacent chunks joined."""
    same: list[tuple[int, int]] = []
    differ: list[tuple[int, int]] = []
    end = msg.offset + msg.length
    for i, digest in enumerate(msg.digests):
        off = msg.offset + i * msg.chunk_size
        n = min(msg.chunk_size, end - off)
        rel = off - msg.offset
        mine = zero_digest(n) if data is None else \
            hashlib.sha256(memoryview(data)[rel:rel + n]).digest()
        runs = same if mine == digest else differ
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((off, n))
    return same, differ


class SyncJob(Requester, threading.Thread):
    """Drives one volume's FULL, DIRTY or VERIFY sync in its own thread.

    Requests go out through two ``RequestWindow``s sharing the job's
    Condition: ``reads`` (READs, until answered) and ``queries`` (DIRTY_QUERY,
    CHECKSUM_QUERY, EXTENT_QUERY).  The recv loop checks each answer against
    its request (SY-5: one that does not fit abandons the sync), journals
    READ_REPLYs in stream order and hands the queries' answers over.  A READ's
    piece counts as done once its SYNCED was sent, i.e. once the reply is
    durable (``unsynced`` until then).

    A FULL sync on a connection granted feature EXTENTS walks the volume with
    EXTENT_QUERY first (``pull_sparse``): the recv loop journals each answer's
    zero extents as ZERO records at the answer's place in the stream (SY-16;
    holes stay holes) and hands the data extents over, which are READ as
    above.  So a sparse volume costs what its data costs.  On a volume whose
    image read as zeroes when the sync began (``zero_image``), the zero
    extents need no record at all, only their SYNCED (``on_extents``).

    Threads::

        run, pull, pull_sparse     sync-VOLUME
        verify, query_dirty        sync-VOLUME
        complete, progress         sync-VOLUME
        pieces, check_stop         sync-VOLUME
        wait_reads, wait_window    sync-VOLUME
        wait, answer               sync-VOLUME
        fits                       sync-VOLUME, and ``wake``'s threads (the Condition held)
        wake                       conn-HOST:PORT and acker-HOST:PORT (the Condition held)
        on_read_reply, on_extents  conn-HOST:PORT (the recv loop)
        on_reply, on_error         conn-HOST:PORT (the recv loop)
        check_answer, abandon      conn-HOST:PORT (the recv loop)
        give_up                    conn-HOST:PORT (the recv loop)
        add_extents                conn-HOST:PORT (a DIRTY_MAP), under Attachments.sync_lock
        begin                      conn-HOST:PORT (ATTACH) or control-N (verify), before the job
                                   starts
        stop, join_if_started      any thread (the connection ending, DETACH, shutdown)
        status                     control-N and rephub-metrics; and sync-VOLUME at its end
    """

    def __init__(self, conn: AgentConnection, vol: Volume, plan: p.SyncPlan, extents=None,
                 online: bool = False, repair: bool = True):
        super().__init__(name=f"sync-{vol.name}", daemon=True)
        # An online verify (operator's ``verify``) runs beside replication; without
        # ``repair`` it only reports the differing chunks and leaves the state alone.
        self.online = online
        self.repair = repair
        self.opened_resync = False   # a report-only verify that READs reported regions
        self.differing: list[tuple[int, int]] = []
        self.completed = False
        self.conn = conn
        self.store = conn.store
        self.vol = vol
        self.plan = plan
        self.extents = list(extents) if extents is not None else None
        self.extra: list[tuple[int, int]] = []
        self.finished = False
        self.cond = threading.Condition()
        self.waiting = None               # what the job thread waits for in ``wait``
        self.reads = RequestWindow(conn, self, vol, self.cond, self.wake)
        self.queries = RequestWindow(conn, self, vol, self.cond)
        self.unsynced: set[int] = set()   # READ reqs until their SYNCED is sent
        self.stop_event = threading.Event()
        self.error: str | None = None
        self.bytes_total = 0
        self.bytes_done = 0
        self.bytes_fetched = 0
        self.started = time.monotonic()
        self.last_progress = self.started
        self.last_sync_seq = 0
        self.chunk = vol.meta["chunk_size"]
        # FULL: the volume's image read as zeroes when the sync began, and no
        # write was reported dropped since (``begin``, ``add_extents``).
        self.zero_image = False

    # -- called by other threads ---------------------------------------------------

    def add_extents(self, extents) -> bool:
        """More regions to read (Attachments.sync_lock held, recv loop); False if the job
        is ending.  A report-only verify READs them too, and the volume's points
        from here until it ends are not crash-consistent, as in any resync."""
        if self.finished or self.stop_event.is_set():
            return False
        if extents and self.online and not self.repair and self.vol.meta["full_synced"]:
            self.opened_resync |= self.store.window.resync_begins(self.vol)
        if extents:
            self.extra.extend(extents)
            self.bytes_total += sum(n for _, n in extents)
            self.zero_image = False     # the image may lack a write: zero extents get records
        return True

    def stop(self) -> None:
        self.stop_event.set()
        with self.cond:
            self.cond.notify_all()

    def join_if_started(self, timeout: float) -> None:
        """Any thread: join, unless the job was never started: on_ATTACH starts
        it only after ATTACHED is sent, and another connection of the agent may
        detach the volume in between (or the send may fail)."""
        if self.ident is not None:
            self.join(timeout)

    def check_answer(self, window: RequestWindow, msg: p.Message) -> None:
        """Recv loop: an answer that does not fit its request abandons the sync."""
        try:
            window.check(msg)
        except p.RequestError as err:
            self.abandon(err)

    def on_read_reply(self, header, msg: p.ReadReply, sums: DataSums | None = None) -> None:
        """Recv loop: journal a READ_REPLY in stream order; SYNCED once durable.
        The answer to a sync that was stopped is dropped, never journaled: the
        volume may be attached elsewhere now."""
        self.check_answer(self.reads, msg)
        self.reads.done(msg.request_id)
        # A zero answer becomes a ZERO record: holes stay holes, never stored as data.
        data = None if msg.is_zero else msg.data
        with self.vol.attach_lock:
            if self.stop_event.is_set() or self.vol.sync is not self:
                log.debug("READ_REPLY req=%d of a stopped sync of %s dropped", msg.request_id,
                          self.vol.name)
                return
            rec = self.store.append_data(self.vol, msg.offset, msg.length, data,
                                         None if msg.is_zero else header.payload_crc,
                                         flags=RECORD_FROM_SYNC, sums=sums)
        self.last_sync_seq = max(self.last_sync_seq, rec.seq)
        req, n = msg.request_id, msg.length

        def done():
            with self.cond:
                self.unsynced.discard(req)
                self.bytes_done += n
                self.bytes_fetched += n
                self.wake()
        self.conn.acker.after(rec.seq, p.Synced(request_id=req, volume=self.vol.id,
                                                offset=msg.offset, length=msg.length), done)

    def on_extents(self, msg: p.Extents) -> None:
        """Recv loop: apply the zero extents of an EXTENTS now, at its place in
        the stream, SYNCED once durable; hand the data extents to the job thread.
        The answer to a sync that was stopped applies nothing, as a READ_REPLY's.

        A zero extent is journaled as ZERO records, unless ``zero_image``: then
        each of its bytes already holds what the answer says, or gets it from
        a write that follows in the stream.  The image read as zeroes when the
        sync began and every write since is journaled (none was reported
        dropped, and SY-19 reports a drop ahead of this answer), so a byte
        holds the last write to it before the answer, or zero if none.  The
        answer reflects that write (SY-16): it wrote zeroes, unless a later
        write the agent had not yet received when it answered zeroed the byte
        on its disk, and that one comes after this frame (or is reported
        dropped, and READ).  The SYNCED waits for every record before the
        answer to be durable, as it would wait for the ZERO's."""
        self.check_answer(self.queries, msg)
        end, zeros, data = split_extents(msg.offset, msg.extents, self.chunk, self.vol.size)
        with self.vol.attach_lock:
            if self.stop_event.is_set() or self.vol.sync is not self:
                log.debug("EXTENTS req=%d of a stopped sync of %s dropped", msg.request_id,
                          self.vol.name)
            elif self.zero_image:
                seq = self.store.journal.last_seq
                self.last_sync_seq = max(self.last_sync_seq, seq)
                for off, n in zeros:
                    self.conn.acker.after(seq, p.Synced(request_id=msg.request_id,
                                                        volume=self.vol.id, offset=off, length=n),
                                          self._count_done(n))
            else:
                for off, n in zeros:
                    self._journal_zeroes(msg.request_id, off, n)
        self.queries.hand_over(msg.request_id, msg, (end, data))

    def _journal_zeroes(self, req: int, offset: int, length: int) -> None:
        """A zero extent as ZERO records of at most ZERO_RECORD_MAX, each SYNCED
        once durable (recv loop, attach_lock held)."""
        for start in range(offset, offset + length, ZERO_RECORD_MAX):
            k = min(ZERO_RECORD_MAX, offset + length - start)
            rec = self.store.append_data(self.vol, start, k, None, flags=RECORD_FROM_SYNC)
            self.last_sync_seq = max(self.last_sync_seq, rec.seq)
            self.conn.acker.after(rec.seq, p.Synced(request_id=req, volume=self.vol.id,
                                                    offset=start, length=k),
                                  self._count_done(k))

    def _count_done(self, n: int):
        def done():
            with self.cond:
                self.bytes_done += n
        return done

    def on_reply(self, msg, barrier_seq: int) -> None:
        """Recv loop: a DIRTY_MAP or CHECKSUMS answering one of our queries."""
        self.check_answer(self.queries, msg)
        self.queries.hand_over(msg.request_id, msg, barrier_seq)

    def abandon(self, err: p.RequestError):
        """Recv loop: a reply that does not fit its request: stop this sync, raise ``err``.

        The volume keeps its state (inconsistent or syncing), so the next
        ATTACH redoes the plan."""
        self.error = str(err)
        log.warning("sync of %s abandoned: %s", self.vol.name, err)
        self.conn.hub.count_error("sync")
        self.stop()
        raise err

    def on_error(self, msg: p.Error) -> None:
        """Recv loop: the agent refused one of our requests: give up this sync."""
        self.conn.requests.drop(msg.request_id)
        self.give_up(f"agent answered {msg.describe()}")

    def give_up(self, why: str) -> None:
        """Recv loop: stop this sync; the volume keeps its state for the next ATTACH."""
        self.error = why
        log.warning("sync of %s aborted: %s", self.vol.name, why)
        self.conn.hub.count_error("sync")
        self.stop()

    # -- the job's thread -------------------------------------------------------------

    def run(self) -> None:
        """Sync thread."""
        vol = self.vol
        try:
            log.info("sync of %s (%s) starts: plan %s", vol.name, fmt_bytes(vol.size),
                     self.plan.name)
            if self.plan == p.SyncPlan.FULL:
                self.bytes_total = vol.size
                if self.conn.features & p.Feature.EXTENTS:
                    self.pull_sparse()
                else:
                    self.pull([(0, vol.size)])
            elif self.plan == p.SyncPlan.DIRTY:
                if self.extents is None:
                    self.extents = self.query_dirty()
                self.bytes_total += sum(n for _, n in self.extents)
                self.pull(self.extents)
            else:
                self.verify()
            while True:
                self.wait_reads(0)
                with self.conn.attached.sync_lock:
                    extra, self.extra = self.extra, []
                    if not extra:
                        self.finished = True
                        break
                self.pull(extra)
            self.complete()
        except JobStopped:
            log.info("sync of %s stopped at %s of %s%s", vol.name, fmt_bytes(self.bytes_done),
                     fmt_bytes(self.bytes_total), f" ({self.error})" if self.error else "")
        except (OSError, ConnectionClosed) as err:
            log.warning("sync of %s stopped: connection %s: %s", vol.name, self.conn.peer, err)
            self.conn.hub.count_error("sync")
        except p.ReplicationError as err:
            log.warning("sync of %s failed: %s", vol.name, err)
            self.conn.hub.count_error("sync")
        except Exception as err:  # noqa: BLE001 - reported, never lost
            log.exception("sync of %s failed: %r", vol.name, err)
            self.conn.hub.count_error("sync")
        finally:
            self.finished = True
            self.reads.close()
            self.queries.close()
            with self.conn.attached.sync_lock:
                if vol.sync is self:
                    vol.sync = None
                self.conn.attached.jobs.discard(self)
            vol.last_sync = self.status()

    def begin(self) -> None:
        """Persist the volume's sync state before the plan is announced (recv loop)."""
        vol = self.vol
        if self.plan == p.SyncPlan.FULL:
            self.zero_image = self.store.reads_as_zeroes(vol)
            vol.update(state=VolState.INCONSISTENT.value, pending_plan="FULL")
        else:
            if vol.meta["full_synced"]:  # points from here on are not crash-consistent
                self.store.window.resync_begins(vol)
            vol.update(state=(VolState.SYNCING if vol.meta["full_synced"]
                              else VolState.INCONSISTENT).value,
                       pending_plan="VERIFY" if "VERIFY" in (
                           self.plan.name, vol.meta.get("pending_plan")) else self.plan.name)

    def check_stop(self) -> None:
        if self.stop_event.is_set() or self.conn.closing.is_set():
            raise JobStopped()

    def pieces(self, extents):
        """Split extents into pieces of at most SYNC_PIECE bytes, each widened to
        MIN_CHUNK (4 KiB) boundaries, not to chunks: an agent that tracks 4 KiB
        blocks reports them (PROTOCOL.md "DIRTY_MAP"), and a READ of what it
        reported is a READ of what was written; chunk-aligned extents stay as
        they are.  The last piece may stop at the volume's end."""
        size = self.vol.size
        for off, n in extents:
            start = off - off % p.MIN_CHUNK
            end = min(-(-(off + n) // p.MIN_CHUNK) * p.MIN_CHUNK, size)
            while start < end:
                k = min(SYNC_PIECE, end - start)
                yield start, k
                start += k

    def wait_reads(self, limit: int) -> None:
        """Wait until at most ``limit`` READs are outstanding (not yet durable)."""
        self.wait(lambda: len(self.unsynced) <= limit)

    def fits(self, reads: int, nbytes: int) -> bool:
        """(The job's Condition held) Do ``reads`` more READs of ``nbytes`` in
        all fit the window (SYNC_WINDOW pieces' worth of bytes, at most
        SYNC_MAX_READS READs not yet answered)?"""
        asked = self.reads.asked
        return not asked or (len(asked) + reads <= SYNC_MAX_READS and
                             self.reads.asked_bytes + nbytes <= SYNC_WINDOW * SYNC_PIECE)

    def wait_window(self, reads: int, nbytes: int) -> None:
        """Wait until ``reads`` READs of ``nbytes`` in all fit the window."""
        self.wait(lambda: self.fits(reads, nbytes))

    def wait(self, ready) -> None:
        """Wait until ``ready()`` holds (the job's Condition held), then report progress."""
        with self.cond:
            self.waiting = ready
        try:
            self.reads.wait_for(ready, self.check_stop)
        finally:
            with self.cond:
                self.waiting = None
        self.check_stop()
        self.progress()

    def wake(self) -> None:
        """(The Condition held) A READ was answered, or its SYNCED sent: wake
        the job thread if what it waits for in ``wait`` holds now (or if it
        waits elsewhere, in ``answer``).  This runs once or twice per READ, in
        the recv loop and the acker; a wake-up that finds the window still
        short of a batch would only take the GIL."""
        if self.waiting is None or self.waiting():
            self.cond.notify_all()

    def pull(self, extents) -> None:
        """READ every piece of ``extents``, within the window, SYNC_BATCH at a
        time: the job waits until that many fit, so that one wake-up and one
        send serve several READs, not one answer's worth each.  Under
        ``--sync-rate`` each READ leaves when the rate lets it, alone."""
        rate = self.conn.hub.rate
        size = SYNC_BATCH if rate.rate <= 0 else 1
        batch: list[p.Read] = []
        for off, n in self.pieces(extents):
            if batch:
                with self.cond:
                    full = len(batch) == size or not self.fits(
                        len(batch) + 1, sum(r.length for r in batch) + n)
                if full:
                    self.reads.ask_many(batch)
                    batch = []
            if not batch:
                self.wait_window(size, size * n)
            rate.acquire(n, self.stop_event)
            self.check_stop()
            read = p.Read(request_id=self.conn.requests.new_id(), volume=self.vol.id,
                          offset=off, length=n)
            with self.cond:
                self.unsynced.add(read.request_id)
            batch.append(read)
        if batch:
            self.reads.ask_many(batch)

    def pull_sparse(self) -> None:
        """FULL sync with EXTENTS: EXTENT_QUERY the volume in EXTENT_SPAN ranges,
        EXTENT_WINDOW in flight; READ the data extents of each answer (the recv
        loop has journaled its zero extents already); ask again for the rest of
        a range an answer covered only in part."""
        size = self.vol.size
        todo = collections.deque((off, min(EXTENT_SPAN, size - off))
                                 for off in range(0, size, EXTENT_SPAN))

        def query(off: int, n: int) -> int:
            return self.queries.ask(p.ExtentQuery(request_id=self.conn.requests.new_id(),
                                                  volume=self.vol.id, offset=off, length=n))
        for _, msg, (end, data) in pipelined(todo, EXTENT_WINDOW, query, self.answer):
            if end < msg.offset + msg.length:
                todo.appendleft((end, msg.offset + msg.length - end))
            self.pull(data)

    def answer(self, reqs) -> tuple:
        """Wait for the recv loop to hand over the answer to one of ``reqs``
        (a DIRTY_MAP, CHECKSUMS or EXTENTS): (req, answer, context)."""
        got = self.queries.take(reqs, self.check_stop)
        self.check_stop()
        return got

    def query_dirty(self) -> list[tuple[int, int]]:
        req = self.queries.ask(p.DirtyQuery(request_id=self.conn.requests.new_id(),
                                            volume=self.vol.id))
        _, msg, _ = self.answer([req])
        log.info("sync of %s: agent reports %d dirty extents (%s)", self.vol.name,
                 len(msg.extents), fmt_bytes(sum(n for _, n in msg.extents)))
        return list(msg.extents)

    def verify(self) -> None:
        """CHECKSUM_QUERY over the volume; READ what differs; SYNCED what matches."""
        self.bytes_total = self.vol.size
        for msg, barrier in query_checksums(self.conn, self.vol, self.chunk, self.queries.ask,
                                            self.answer):
            data = self.store.window.read_at(self.vol, barrier, msg.offset, msg.length, check=False)
            same, differ = compare_digests(msg, data)
            for off, n in same:
                self.bytes_done += n
                self.conn.acker.after(barrier, p.Synced(request_id=msg.request_id,
                                                        volume=self.vol.id, offset=off,
                                                        length=n))
            if differ:
                log.info("verify of %s: %d differing ranges in [%d, %d)", self.vol.name,
                         len(differ), msg.offset, msg.offset + msg.length)
                self.differing.extend(differ)
                if self.repair:
                    self.bytes_total += sum(n for _, n in differ)
                    self.pull(differ)
            self.progress()

    def complete(self) -> None:
        """Every piece is SYNCED: the volume is consistent once all it was compared
        with is durable too (a VERIFY where everything matched sent no READ)."""
        vol = self.vol
        while not self.store.journal.wait_durable(self.store.journal.last_seq, timeout=0.5):
            self.check_stop()
        with vol.attach_lock:   # a connection that took the volume over owns its state now
            if self.stop_event.is_set() or vol.sync is not self:
                raise JobStopped()
            self._complete()

    def _complete(self) -> None:
        vol = self.vol
        if self.online and not self.repair:
            log.info("verify of %s done: %d differing ranges (%s), nothing repaired", vol.name,
                     len(self.differing), fmt_bytes(sum(n for _, n in self.differing)))
            if self.opened_resync:   # the regions the agent reported meanwhile are in
                self.store.window.resync_ends(vol)
            self.completed = True
            return
        self.store.window.resync_ends(vol)
        self.store.health.clear(Fault.REPLICA_DAMAGED, vol.name)
        changes = dict(state=VolState.CONSISTENT.value, pending_plan=None, full_synced=True)
        if not vol.meta["full_synced"]:
            changes["consistent_since_seq"] = max(self.last_sync_seq, 1)
        vol.update(**changes)
        took = time.monotonic() - self.started
        log.info("volume %s is consistent: %s sync done, %s fetched in %.1f s", vol.name,
                 self.plan.name, fmt_bytes(self.bytes_fetched), took)
        self.completed = True

    def progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_progress >= PROGRESS_INTERVAL:
            self.last_progress = now
            st = self.status()
            log.info("sync of %s: %.1f%% (%s of %s) at %s/s, ETA %s", self.vol.name,
                     st["percent"], fmt_bytes(st["bytes_done"]), fmt_bytes(st["bytes_total"]),
                     fmt_bytes(st["rate"]), "-" if st["eta_s"] is None else f"{st['eta_s']:.0f} s")

    def status(self) -> dict:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.bytes_done / elapsed
        left = max(self.bytes_total - self.bytes_done, 0)
        return dict(plan=self.plan.name, bytes_done=self.bytes_done,
                    bytes_total=self.bytes_total, bytes_fetched=self.bytes_fetched,
                    percent=(100.0 * self.bytes_done / self.bytes_total if self.bytes_total
                             else 100.0),
                    rate=rate, eta_s=(left / rate) if rate > 0 else None,
                    running=not self.finished, error=self.error)


# ---------------------------------------------------------------------------
# Recovery sessions (PROTOCOL.md "Recovery (remote IO)")
#
# An agent in recovery mode opens a session on a volume at a point
# (RECOVER_OPEN) and forwards its recovery VM's IO as RREAD/RWRITE/RFLUSH.
# TEST: reads are the volume at the point (``RecoveryWindow.read_at``) with the
# session's own writes laid over them from an ``Overlay``; the journal and the
# replica never see a test write, and the overlay is deleted at RECOVER_CLOSE,
# at the end of the connection, and (leftovers of a killed hub) at start.
# FAILOVER: the volume is promoted first (``Recovery.promote``); the session's
# writes are journaled like any write and become the volume's history.

SCRATCH_DIR = "scratch"


class ExtentKind(enum.IntEnum):
    """What an overlay extent holds."""

    DATA = 1   # the bytes are in the overlay file at the same offsets
    ZERO = 2   # the session wrote zeroes there


class Overlay:
    """A TEST session's writes: ``DIR/scratch/<session>/overlay`` (sparse, the
    written bytes at their own offsets) and an in-memory extent map of what the
    session wrote.  Used by the connection thread of the session only.

    Threads::

        *                    conn-HOST:PORT of the session's agent
    """

    def __init__(self, directory: str, size: int):
        makedirs_private(directory, exist_ok=False)
        self.dir = directory
        self.fd = os.open(os.path.join(directory, "overlay"),
                          os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, size)
        self.starts: list[int] = []                   # sorted extent starts
        self.extents: list[tuple[int, int, int]] = []  # (start, end, ExtentKind)

    def _span(self, start: int, end: int) -> tuple[int, int]:
        """Index range of the extents overlapping [start, end)."""
        i = bisect.bisect_right(self.starts, start) - 1
        if i < 0 or self.extents[i][1] <= start:
            i += 1
        return i, bisect.bisect_left(self.starts, end)

    def write(self, offset: int, length: int, data) -> None:
        """Lay ``data`` (None: zeroes) over [offset, offset+length); durable on return."""
        end = offset + length
        if data is not None:
            os.pwrite(self.fd, data, offset)
            os.fdatasync(self.fd)
        i, j = self._span(offset, end)
        new = []
        if i < j and self.extents[i][0] < offset:
            new.append((self.extents[i][0], offset, self.extents[i][2]))
        new.append((offset, end, ExtentKind.DATA if data is not None else ExtentKind.ZERO))
        if i < j and self.extents[j - 1][1] > end:
            new.append((end, self.extents[j - 1][1], self.extents[j - 1][2]))
        self.extents[i:j] = new
        self.starts[i:j] = [e[0] for e in new]

    def lay_over(self, base: memoryview | None, offset: int,
                 length: int) -> bytes | memoryview | None:
        """``base`` (None: zeroes) with the session's writes applied; None if all zero."""
        end = offset + length
        i, j = self._span(offset, end)
        if i >= j:
            return base
        buf = bytearray(base) if base is not None else bytearray(length)
        for start, stop, kind in self.extents[i:j]:
            lo, hi = max(start, offset), min(stop, end)
            if kind == ExtentKind.DATA:
                buf[lo - offset:hi - offset] = os.pread(self.fd, hi - lo, lo)
            else:
                buf[lo - offset:hi - offset] = bytes(hi - lo)
        return None if p.is_zero(buf) else bytes(buf)

    def discard(self) -> None:
        os.close(self.fd)
        shutil.rmtree(self.dir, ignore_errors=True)


class Recovery:
    """The hub's recovery sessions (PROTOCOL.md "Recovery (remote IO)") and
    promotions, and the reservation that lets one recovery operation at a
    time act on a volume: a session, a promotion or a fail-back; another is
    refused with BUSY.  ``sessions`` maps a volume's name to its open session,
    or to None while it is reserved for a promotion or a session opening.

    Threads::

        open                       conn-HOST:PORT (RECOVER_OPEN)
        close                      conn-HOST:PORT (RECOVER_CLOSE, the connection ends), or
                                   control-N (a fail-back ends the session)
        promote                    control-N, or conn-HOST:PORT (a FAILOVER session opens)
        reserve                    conn-HOST:PORT or control-N; takes lock
        status                     control-N and rephub-metrics; takes lock
    """

    def __init__(self, hub: Hub):
        self.hub = hub
        self.store = hub.store
        self.lock = threading.Lock()
        self.sessions: dict[str, RecoverySession | None] = {}  # by volume name (BUSY)

    def open(self, conn: AgentConnection, mode: p.RecoverMode, name: str,
             point: str) -> RecoverySession:
        """Open a TEST or FAILOVER session for ``conn``'s agent (RC-1, RC-2)."""
        vol = self.store.volume(name)
        if vol is None:
            raise p.RequestError(f"no volume named {name!r}", code=p.ErrorCode.NO_SUCH_VOLUME)
        if not self.hub.agents.may_recover(conn.agent_id, vol.owner):
            raise p.RequestError(f"agent {conn.agent_id} may not recover volume {name!r} of "
                                 f"agent {vol.owner} (not its owner, and the agents file "
                                 f"does not give it recover={vol.owner})",
                                 code=p.ErrorCode.NOT_OWNER)
        self.reserve(vol)
        try:
            if mode == p.RecoverMode.TEST:
                seq, t_ns = self.store.window.resolve_point(vol, point)
                sid = next(conn.session_ids)
                overlay = Overlay(os.path.join(self.store.dir, SCRATCH_DIR,
                                               f"{vol.id}-{secrets.token_hex(6)}"), vol.size)
                self.store.window.pin(seq)
            elif vol.role is Role.PROMOTED and point == "latest":
                seq, t_ns = self.store.window.resolve_point(vol, point)  # carry on the new history
                sid, overlay = next(conn.session_ids), None
            else:
                res = self.promote(vol.name, point, reserved=True)
                seq, t_ns, sid, overlay = res["seq"], res["time_ns"], next(conn.session_ids), None
            s = RecoverySession(sid, conn, vol, mode, point, seq, t_ns, overlay)
        except BaseException:
            with self.lock:
                self.sessions.pop(vol.name, None)
            raise
        with self.lock:
            self.sessions[vol.name] = s
        conn.sessions[sid] = s
        log.info("recovery: %s opened", s.describe())
        return s

    def reserve(self, vol: Volume) -> None:
        """Take ``vol`` for one recovery operation, or refuse with BUSY."""
        with self.lock:
            fb = vol.failback
            if fb is not None and fb.phase.running:
                raise p.RequestError(f"volume {vol.name!r} is busy: failing back to agent "
                                     f"{fb.agent} ({fb.phase.value})", code=p.ErrorCode.BUSY)
            if vol.name in self.sessions:
                other = self.sessions[vol.name]
                raise p.RequestError(f"volume {vol.name!r} is busy: "
                                     f"{other.describe() if other else 'being promoted'}",
                                     code=p.ErrorCode.BUSY)
            self.sessions[vol.name] = None

    def close(self, s: RecoverySession) -> int:
        """End a session (RECOVER_CLOSE or end of connection); return the seq its
        ACK waits for.  A TEST overlay is deleted here (RC-5)."""
        if s.conn.sessions.pop(s.id, None) is None:
            return 0
        if s.overlay is not None:
            s.overlay.discard()
            self.store.window.pin(s.seq, -1)
        with self.lock:
            if self.sessions.get(s.vol.name) is s:
                del self.sessions[s.vol.name]
        log.info("recovery: %s closed after %d writes%s", s.describe(), s.writes,
                 "; overlay discarded" if s.overlay is not None else "")
        return s.flush_seq()

    def promote(self, volume: str, at: str, reserved: bool = False) -> dict:
        """Promote ``volume`` at point ``at`` (FAILOVER, or ``rephub.py promote``):
        newer journal entries are set aside, the replica rolled back, and the
        protected side's WRITE/ZERO/ATTACH refused with ERROR(ROLE) from now on."""
        vol = self.store.volume(volume)
        if vol is None:
            raise p.RequestError(f"no volume named {volume!r}", code=p.ErrorCode.NO_SUCH_VOLUME)
        if not reserved:
            self.reserve(vol)
        try:
            seq, t_ns = self.store.window.resolve_point(vol, at)
            conn = vol.attached_to
            job = vol.sync
            if job is not None:  # a resync from the protected side ends here
                job.stop()
                if job is not threading.current_thread():
                    job.join(timeout=5)
            res = self.store.roles.promote(vol, seq, at)
            if conn is not None:
                log.info("volume %s: the protected agent %s stays connected; its writes to "
                         "the volume are refused (ROLE)", vol.name, conn.agent_id)
        finally:
            if not reserved:
                with self.lock:
                    self.sessions.pop(vol.name, None)
        return dict(res, time_ns=t_ns)

    def status(self) -> list[dict]:
        """The open recovery sessions, for ``status``."""
        with self.lock:
            sessions = [s for s in self.sessions.values() if s is not None]
        return [dict(volume=s.vol.name, mode=s.mode.name, point=s.point, seq=s.seq,
                     agent=s.conn.agent_id, address=s.conn.peer, writes=s.writes)
                for s in sorted(sessions, key=lambda s: s.vol.name)]


class RecoverySession:
    """One open session.  Created by ``Recovery.open``; its methods run on
    the connection thread of the agent that opened it.

    Threads::

        describe             any thread (logs, status)
        *                    conn-HOST:PORT of the session's agent
    """

    def __init__(self, sid: int, conn: AgentConnection, vol: Volume, mode: p.RecoverMode,
                 point: str, seq: int, time_ns: int, overlay: Overlay | None):
        self.id = sid
        self.conn = conn
        self.store = conn.store
        self.vol = vol
        self.mode = mode
        self.point = point
        self.seq = seq            # the point: the volume right after this record
        self.read_seq = seq       # FAILOVER: moves to the session's last write
        self.time_ns = time_ns
        self.overlay = overlay
        self.writes = 0

    def read(self, offset: int, length: int) -> tuple[bytes | memoryview | None, int | None]:
        """The session's bytes of a range (None: zeroes) and their CRC-32 if
        known (``RecoveryWindow.read_summed``)."""
        data, crc = self.store.window.read_summed(self.vol, self.read_seq, offset, length)
        if self.overlay is None:
            return data, crc
        laid = self.overlay.lay_over(data, offset, length)
        return laid, (crc if laid is data else None)

    def write(self, offset: int, length: int, data, payload_crc=None,
              sums: DataSums | None = None) -> int:
        """Apply an RWRITE; return the journal seq the ACK waits for (0: durable now)."""
        self.writes += 1
        if self.overlay is not None:
            self.overlay.write(offset, length, data)
            return 0
        rec = self.store.append_data(self.vol, offset, length, data, payload_crc,
                                     recovery=True, sums=sums)
        self.read_seq = rec.seq
        return rec.seq

    def flush_seq(self) -> int:
        return self.read_seq if self.overlay is None else 0

    def describe(self) -> str:
        return (f"{self.mode.name} session {self.id} of {self.vol.name} at {self.point!r} "
                f"(seq {self.seq}) for agent {self.conn.agent_id}")


# ---------------------------------------------------------------------------
# Fail-back (PROTOCOL.md "Fail-back")
#
# A promoted volume goes home to its original agent, which attached it DEMOTED
# (FB-1).  ``rephub.py failback`` runs a ``Failback`` in its control request
# thread: FAILBACK_BEGIN; the late writes (what the old site has that the hub
# never received: its dirty map, or with no trustworthy map the chunks whose
# checksums differ) are READ and saved under DIR/volumes/<name>/failback-<n>/
# (never journaled); a report for the operator to confirm; the recovery
# session fenced (FB-12); the delta (every region written since the promotion,
# set-aside records included, and the late writes) sent as PUTs; then
# FAILBACK_END(DONE), whose ACK gives the volume back to the agent (FB-10).


class FailbackPhase(str, enum.Enum):
    PREPARING = "preparing"      # checks, FAILBACK_BEGIN
    COLLECTING = "collecting"    # DIRTY_QUERY, or CHECKSUM_QUERY over the volume
    PRESERVING = "preserving"    # READ the late writes into late-writes.img
    CONFIRMING = "confirming"    # the report is with the operator
    APPLYING = "applying"        # recovery session fenced, PUTs
    FINISHING = "finishing"      # FAILBACK_END(DONE), role back, recovery session closed
    DONE = "done"
    ABANDONED = "abandoned"      # declined: FAILBACK_END(ABORT), nothing changed
    FAILED = "failed"

    @property
    def running(self) -> bool:
        return self not in (FailbackPhase.DONE, FailbackPhase.ABANDONED, FailbackPhase.FAILED)


def extent_bytes(extents) -> int:
    return sum(n for _, n in extents)


def pieces_of(extents, piece: int):
    """(offset, length) pieces of at most ``piece`` bytes covering ``extents``."""
    for off, n in extents:
        end = off + n
        while off < end:
            k = min(piece, end - off)
            yield off, k
            off += k


def report_extents(extents, limit: int = 64) -> list[list[int]]:
    """The first ``limit`` extents, for a report a person reads."""
    return [[o, n] for o, n in extents[:limit]]


def writes_since(journal: Journal, vol: Volume, after: int, upto: int) -> tuple[list, list, int]:
    """Merged (start, end) regions of ``vol``'s writes in the journal after seq
    ``after`` up to ``upto``: (set-aside ones, the others: the recovery
    site's, how many set-aside records)."""
    aside, recovery = [], []
    while after < upto:
        recs = journal.records_between(after, upto, 4096)
        if not recs:
            break
        for rec in recs:
            if rec.volume == vol.id and rec.kind in (RecordKind.WRITE, RecordKind.ZERO):
                into = aside if vol.set_aside_of(rec.seq) else recovery
                into.append((rec.offset, rec.end))
        after = recs[-1].seq
    return merge_ranges(aside), merge_ranges(recovery), len(aside)


class Failback(Requester):
    """One fail-back of ``vol`` to the agent of ``conn`` (which attached it DEMOTED).

    ``run`` drives it in the caller's thread (a control request thread) and
    returns the summary, or raises RequestError; ``emit(obj)`` sends progress to
    the operator, ``confirm(report)`` returns their answer.  The agent's answers
    arrive on the connection's recv loop, which checks each against its
    request and hands it over through ``on_ack``/``on_error``/``on_read_reply``/
    ``on_reply`` into ``pending``, the ``RequestWindow`` of this fail-back (the
    owner of its requests in ``conn.requests``, as a SyncJob is of its own).

    Threads::

        run                        control-N: the whole fail-back, start to end
        begin, collect, compare    control-N
        preserve, report, apply    control-N
        finish, end, call, wait    control-N
        ask, fail, set_phase       control-N
        progress, merged_delta     control-N
        summary                    control-N
        late_summary               control-N, and conn-HOST:PORT (FAILBACK_END's ACK)
        connection_gone            control-N (a send failed)
        on_ack, on_error           conn-HOST:PORT (the recv loop)
        on_read_reply, on_reply    conn-HOST:PORT (the recv loop)
        give_up                    conn-HOST:PORT (the recv loop)
        status                     control-N and rephub-metrics
    """

    def __init__(self, hub: Hub, vol: Volume, conn: AgentConnection, emit, confirm):
        self.hub = hub
        self.store = hub.store
        self.vol = vol
        self.conn = conn
        self.agent = conn.agent_id
        self.attach = conn.attached.demoted[vol.id]   # the agent's DEMOTED ATTACH
        self.emit = emit
        self.confirm = confirm
        self.phase = FailbackPhase.PREPARING
        self.pending = RequestWindow(conn, self, vol)
        self.begun = False        # FAILBACK_BEGIN was ACKed: the agent takes PUTs
        self.fenced = False       # the recovery session's RWRITEs are refused (FB-12)
        self.end_req = 0          # FAILBACK_END(DONE)'s request id
        self.returned = False     # its ACK came: the volume is the agent's again
        self.late: list[tuple[int, int]] = []
        self.late_known = True    # False: no trustworthy dirty map, chunks compared
        self.late_why = ""
        self.late_dir: str | None = None
        self.delta: list[tuple[int, int]] = []
        self.done_bytes = 0
        self.total_bytes = 0
        self.sent_bytes = 0       # PUT lengths sent (FLAG_ZERO ones included)
        self.error: str | None = None
        self.started = time.monotonic()
        self.started_ns = time.time_ns()
        self.last_emit = 0.0
        promos = vol.current_promotions()
        #: Records of the volume after this seq are its writes since the promotion:
        #: the set-aside ones and the recovery site's (PROTOCOL.md FB-8).
        self.since_seq = min(pr["point_seq"] for pr in promos) if promos else \
            self.store.journal.last_seq

    # -- the recv loop hands answers over (connection thread) -----------------------

    def on_ack(self, msg: p.Ack) -> None:
        if msg.request_id == self.end_req and msg.request_id:
            # FB-10: the volume is the agent's again before its next frame is read.
            self._role_returns()
        self.pending.hand_over(msg.request_id, msg)

    def on_error(self, msg: p.Error) -> None:
        self.pending.hand_over(msg.request_id, msg)

    def give_up(self, why: str) -> None:
        """Recv loop: the hub refused an answer to one of our requests, so
        what we wait for will not come: fail every wait with ``why``."""
        self.pending.hand_over_all(why)

    def on_read_reply(self, header, msg: p.ReadReply, sums: DataSums | None = None) -> None:
        self.on_reply(msg, 0)

    def on_reply(self, msg, barrier_seq: int) -> None:
        """A READ_REPLY, DIRTY_MAP or CHECKSUMS answering our request (recv loop):
        one that does not fit it fails the wait for it, and is refused."""
        try:
            self.pending.check(msg)
        except p.RequestError as err:
            self.pending.hand_over(msg.request_id, str(err))
            raise
        self.pending.hand_over(msg.request_id, msg, barrier_seq)

    def _role_returns(self) -> None:
        """FAILBACK_END(DONE) is ACKed (recv loop): the agent's disk equals the
        volume; it is protected again, attached normally on this connection."""
        vol, a = self.vol, self.attach
        entry = dict(time_ns=time.time_ns(), agent=self.agent, delta_bytes=extent_bytes(self.delta),
                     sent_bytes=self.sent_bytes, after_seq=self.store.journal.last_seq,
                     late_writes=self.late_summary(), late_writes_dir=self.late_dir)
        vol.update(role=Role.PROTECTED.value,
                   failbacks=vol.meta.get("failbacks", []) + [entry],
                   state=VolState.CONSISTENT.value, pending_plan=None,
                   generation=bytes(a.generation).hex(), chunk_size=a.chunk_size)
        self.conn.attached.demoted.pop(vol.id, None)
        self.returned = True
        log.info("volume %s failed back to agent %s: protected again, its writes are "
                 "journaled from the next frame on", vol.name, self.agent)

    # -- the driver (control request thread) -------------------------------------------

    def fail(self, text: str, code=p.ErrorCode.IO_ERROR):
        raise p.RequestError(f"fail-back of {self.vol.name} to agent {self.agent}: {text}",
                             code=code)

    def set_phase(self, phase: FailbackPhase, text: str) -> None:
        self.phase = phase
        log.info("fail-back of %s to %s: %s: %s", self.vol.name, self.agent, phase.value, text)
        self._emit(dict(phase=phase.value, message=text), force=True)

    def _emit(self, obj: dict, force: bool = False) -> None:
        """Tell the operator; a CLI that went away does not stop the fail-back."""
        now = time.monotonic()
        if not force and now - self.last_emit < 0.5:
            return
        self.last_emit = now
        try:
            self.emit(obj)
        except (OSError, ValueError):
            pass

    def progress(self) -> None:
        self._emit(dict(phase=self.phase.value, progress=self.done_bytes,
                        total=self.total_bytes))

    def ask(self, msg: p.Message, payload_crc: int | None = None) -> int:
        """Send a request whose answer comes back to us; return its id."""
        try:
            return self.pending.ask(msg, payload_crc)
        except (OSError, ConnectionClosed) as err:
            self.connection_gone(str(err))

    def connection_gone(self, detail: str) -> None:
        self.fail(f"the agent's connection is gone ({detail}); the volume stays promoted, "
                  "nothing changed on the hub: run the fail-back again", p.ErrorCode.IO_ERROR)

    def wait(self, reqs, what: str):
        """The first answer to one of ``reqs``: (req, msg, barrier).  An ERROR, a
        refused answer, a lost connection or a timeout fails the fail-back."""
        def connected():
            if self.conn.closing.is_set() or self.hub.stopping.is_set():
                self.connection_gone(f"closed while waiting for {what}")
        got = self.pending.take(reqs, connected, time.monotonic() + FAILBACK_ANSWER_TIMEOUT)
        if got is None:
            self.fail(f"no answer to {what} within {FAILBACK_ANSWER_TIMEOUT:.0f} s",
                      p.ErrorCode.IO_ERROR)
        req, item, barrier = got
        if isinstance(item, str):
            self.fail(f"bad answer to {what}: {item}", p.ErrorCode.PROTOCOL)
        if isinstance(item, p.Error):
            code = item.code if item.code in set(p.ErrorCode) else p.ErrorCode.IO_ERROR
            self.fail(f"the agent answered {what} with ERROR {item.code_name()}: "
                      f"{item.message}", code)
        return req, item, barrier

    def call(self, msg: p.Message, what: str):
        """Send one request and wait for its answer."""
        return self.wait([self.ask(msg)], what)[1]

    def run(self) -> dict:
        try:
            self.begin()
            self.collect()
            self.preserve()
            report = self.report()
            self.set_phase(FailbackPhase.CONFIRMING, "waiting for the operator")
            if not self.confirm(report):
                self.end(p.FailbackOutcome.ABORT)
                self.phase = FailbackPhase.ABANDONED
                log.info("fail-back of %s to %s abandoned by the operator: nothing changed",
                         self.vol.name, self.agent)
                return dict(self.summary(), outcome="abandoned",
                            message="fail-back abandoned: nothing changed")
            self.apply()
            self.finish()
            self.phase = FailbackPhase.DONE
            return dict(self.summary(), outcome="done")
        except BaseException as err:
            self.error = str(err)
            self.phase = FailbackPhase.FAILED
            log.warning("fail-back of %s to %s failed: %s", self.vol.name, self.agent, err)
            if self.begun and not self.returned and not self.conn.closing.is_set():
                try:  # the agent resumes as before, still DEMOTED (FB-11)
                    self.end(p.FailbackOutcome.ABORT)
                except p.RequestError as abort_err:
                    log.warning("fail-back of %s: FAILBACK_END(ABORT) failed too: %s",
                                self.vol.name, abort_err)
            raise
        finally:
            if self.fenced and not self.returned:
                log.info("fail-back of %s: the recovery session may write again",
                         self.vol.name)
            self.fenced = False
            self.pending.close()

    def begin(self) -> None:
        self.set_phase(FailbackPhase.PREPARING, f"FAILBACK_BEGIN to agent {self.agent}")
        self.call(p.FailbackBegin(request_id=self.conn.requests.new_id(), volume=self.vol.id),
                  "FAILBACK_BEGIN")
        self.begun = True

    def end(self, outcome: p.FailbackOutcome) -> None:
        req = self.conn.requests.new_id()
        if outcome == p.FailbackOutcome.DONE:
            self.end_req = req
        self.call(p.FailbackEnd(request_id=req, volume=self.vol.id, outcome=outcome),
                  f"FAILBACK_END({outcome.name})")
        self.begun = False

    def collect(self) -> None:
        """The late writes: the agent's dirty map if it can be trusted (ATTACH
        said CLEAN/DIRTY with the generation the hub knows), else the chunks
        whose checksums differ from the hub's volume (FB-8)."""
        a, vol, j = self.attach, self.vol, self.store.journal
        if bytes(a.generation).hex() != vol.meta["generation"]:
            self.late_known, self.late_why = False, "another generation (state created anew)"
        elif a.state == p.VolumeState.UNKNOWN:
            self.late_known, self.late_why = False, "the agent reported state UNKNOWN"
        elif j.first_seq > self.since_seq + 1:
            self.late_known = False
            self.late_why = "the journal no longer covers the promotion"
        if self.late_known:
            self.set_phase(FailbackPhase.COLLECTING, "DIRTY_QUERY: the agent's dirty map")
            msg = self.call(p.DirtyQuery(request_id=self.conn.requests.new_id(), volume=vol.id),
                            "DIRTY_QUERY")
            self.late = [(s, e - s) for s, e in merge_ranges((o, o + n) for o, n in msg.extents)]
        else:
            self.set_phase(FailbackPhase.COLLECTING, f"no trustworthy dirty map ({self.late_why}):"
                           " comparing checksums over the whole volume")
            self.late = self.compare()

    def compare(self) -> list[tuple[int, int]]:
        """CHECKSUM_QUERY over the volume against the hub's current volume; the
        differing chunks, merged."""
        self.total_bytes, self.done_bytes = self.vol.size, 0
        differ: list[tuple[int, int]] = []
        for msg, barrier in query_checksums(self.conn, self.vol, self.attach.chunk_size, self.ask,
                                            lambda reqs: self.wait(reqs, "CHECKSUM_QUERY")):
            data = self.store.window.read_at(self.vol, barrier, msg.offset, msg.length)
            differ += [(off, off + n) for off, n in compare_digests(msg, data)[1]]
            self.done_bytes += msg.length
            self.progress()
        return [(s, e - s) for s, e in merge_ranges(differ)]

    def preserve(self) -> None:
        """READ every late region from the agent into late-writes.img (sparse, the
        data at its own offsets) + late-writes.json; never journaled."""
        base = self.vol.dir
        n = 1
        while os.path.exists(os.path.join(base, FAILBACK_DIR.format(n=n))):
            n += 1
        self.late_dir = os.path.join(base, FAILBACK_DIR.format(n=n))
        makedirs_private(self.late_dir, exist_ok=False)
        self.set_phase(FailbackPhase.PRESERVING, f"saving {len(self.late)} late-write extents "
                       f"({fmt_bytes(extent_bytes(self.late))}) in {self.late_dir}")
        self.total_bytes, self.done_bytes = extent_bytes(self.late), 0
        fd = os.open(os.path.join(self.late_dir, LATE_WRITES_IMAGE),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.vol.size)
            todo = collections.deque(pieces_of(self.late, FAILBACK_PIECE))
            for _, msg, _ in pipelined(todo, FAILBACK_WINDOW, self._read,
                                       lambda reqs: self.wait(reqs, "READ (late writes)")):
                if not msg.is_zero:
                    os.pwrite(fd, msg.data, msg.offset)
                self.done_bytes += msg.length
                self.progress()
            os.fsync(fd)
        finally:
            os.close(fd)
        atomic_write_json(os.path.join(self.late_dir, LATE_WRITES_JSON),
                          dict(self.late_summary(), extents=[[o, k] for o, k in self.late],
                               image=LATE_WRITES_IMAGE, volume=self.vol.name,
                               size=self.vol.size))
        fsync_dir(base)

    def late_summary(self) -> dict:
        return dict(agent=self.agent, time_ns=self.started_ns, known=self.late_known,
                    why_unknown=self.late_why or None, extent_count=len(self.late),
                    bytes=extent_bytes(self.late))

    def report(self) -> dict:
        """What the operator confirms (FB-9): the set-aside entries (kept), the late
        writes (saved, about to be overwritten), the recovery-side writes, the delta."""
        aside, recovery, records = writes_since(self.store.journal, self.vol, self.since_seq,
                                                self.store.journal.last_seq)
        self.delta = self.merged_delta(aside, recovery)
        promos = self.vol.current_promotions()
        as_ext = [(s, e - s) for s, e in aside]
        return dict(
            volume=self.vol.name, agent=self.agent,
            set_aside=dict(records=records, extent_count=len(as_ext),
                           extents=report_extents(as_ext), bytes=extent_bytes(as_ext),
                           promotions=[dict(point=pr["point"], seq=pr["point_seq"],
                                            set_aside_from=pr["set_aside_from"],
                                            set_aside_to=pr["set_aside_to"],
                                            kept=pr.get("kept", True)) for pr in promos],
                           note="kept: fail-back never releases them; export them with "
                                "rephub.py export --set-aside"),
            late_writes=dict(self.late_summary(), extents=report_extents(self.late),
                             saved_in=self.late_dir,
                             image=os.path.join(self.late_dir, LATE_WRITES_IMAGE)),
            recovery_writes=dict(extent_count=len(recovery),
                                 bytes=sum(e - s for s, e in recovery)),
            delta=dict(extent_count=len(self.delta), extents=report_extents(self.delta),
                       bytes=extent_bytes(self.delta)))

    def merged_delta(self, aside, recovery) -> list[tuple[int, int]]:
        late = [(o, o + n) for o, n in self.late]
        return [(s, e - s) for s, e in merge_ranges([*aside, *recovery, *late])]

    def apply(self) -> None:
        """Fence the recovery session, wait until the replica has every record,
        send the delta as PUTs (FB-8), FAILBACK_WINDOW in flight."""
        j, vol = self.store.journal, self.vol
        def fence():  # append_data refuses every later RWRITE (Roles.check_writer)
            self.fenced = True
        last = j.fence(fence)
        self.set_phase(FailbackPhase.APPLYING, "recovery session fenced: its writes are "
                       "refused from now on")
        self.store.window.pin(last)
        try:
            if not j.wait_durable(last, timeout=FAILBACK_ANSWER_TIMEOUT):
                self.fail(f"the journal did not become durable up to seq {last}")
            self.store.applier.wait_applied(last, timeout=FAILBACK_ANSWER_TIMEOUT)
            aside, recovery, _ = writes_since(j, vol, self.since_seq, last)  # the newest too
            self.delta = self.merged_delta(aside, recovery)
            self.total_bytes, self.done_bytes = extent_bytes(self.delta), 0
            self._emit(dict(phase=self.phase.value, message=f"sending {len(self.delta)} "
                            f"extents ({fmt_bytes(self.total_bytes)}) as PUTs"), force=True)
            todo = collections.deque(pieces_of(self.delta, FAILBACK_PIECE))
            for (_, k), _, _ in pipelined(todo, FAILBACK_WINDOW,
                                          lambda off, k: self._put(last, off, k),
                                          lambda reqs: self.wait(reqs, "PUT")):
                self.done_bytes += k
                self.progress()
        finally:
            self.store.window.pin(last, -1)

    def _read(self, off: int, k: int) -> int:
        return self.ask(p.Read(request_id=self.conn.requests.new_id(), volume=self.vol.id,
                               offset=off, length=k))

    def _put(self, seq: int, off: int, k: int) -> int:
        """PUT the volume's [off, off+k) as of ``seq`` (a hole as FLAG_ZERO)."""
        data, crc = self.store.window.read_summed(self.vol, seq, off, k)
        req = self.conn.requests.new_id()
        req = self.ask(p.Put(request_id=req, volume=self.vol.id, offset=off, length=k,
                             flags=p.FLAG_ZERO) if data is None else
                       p.Put(request_id=req, volume=self.vol.id, offset=off, data=data), crc)
        self.sent_bytes += k
        return req

    def finish(self) -> None:
        """Every PUT is ACKed: FAILBACK_END(DONE); its ACK returns the role (in the
        recv loop); then the recovery session is closed with GOODBYE (FB-12)."""
        self.set_phase(FailbackPhase.FINISHING, "FAILBACK_END(DONE)")
        self.end(p.FailbackOutcome.DONE)
        if not self.returned:
            self.fail("FAILBACK_END was answered but the volume was not handed back")
        with self.hub.recovery.lock:
            s = self.hub.recovery.sessions.get(self.vol.name)
        if s is not None:
            self.hub.recovery.close(s)
            reason = f"volume {self.vol.name} failed back to agent {self.agent}"
            if s.conn.sessions:
                log.warning("recovery connection %s keeps other sessions open: not closed",
                            s.conn.peer)
            else:
                s.conn.say_goodbye(reason, p.GoodbyeCode.FAILED_BACK)

    def summary(self) -> dict:
        return dict(volume=self.vol.name, agent=self.agent,
                    delta_bytes=extent_bytes(self.delta), sent_bytes=self.sent_bytes,
                    late_writes=self.late_summary(), late_writes_dir=self.late_dir,
                    seconds=round(time.monotonic() - self.started, 3))

    def status(self) -> dict:
        return dict(phase=self.phase.value, to=self.agent, done_bytes=self.done_bytes,
                    total_bytes=self.total_bytes, sent_bytes=self.sent_bytes,
                    delta_bytes=extent_bytes(self.delta), late_writes_bytes=extent_bytes(self.late),
                    late_writes_known=self.late_known, late_writes_dir=self.late_dir,
                    fenced=self.fenced, started=fmt_time_ns(self.started_ns), error=self.error)


# ---------------------------------------------------------------------------
# Metrics: ``serve --metrics-listen HOST:PORT`` (Prometheus text format 0.0.4)
#
# Built from the status document the control socket serves, so the two never
# disagree.  Counters count since the hub started.

#: The kinds ``Hub.count_error`` counts, each at a WARNING of the same cause;
#: every one is exported, 0 until it happens, so alerts have a series to watch.
HUB_ERROR_KINDS = ("handshake", "auth", "protocol", "request", "connection_lost", "sync",
                   "refused")


def hub_metrics(st: dict) -> str:
    """The hub's status document (``Hub.status``) as Prometheus text."""
    vols = st["volumes"]
    syncs = [(v, v["sync"]) for v in vols if v["sync"]]
    errors = dict.fromkeys(HUB_ERROR_KINDS, 0) | st.get("errors", {})
    j = st["journal"]
    return prometheus_text([
        ("rephub_replicated_bytes_total", "counter",
         "Data bytes of WRITEs and READ_REPLYs journaled since the hub started.",
         [({"volume": v["name"]}, v["replicated_bytes"]) for v in vols]),
        ("rephub_volume_lag_seconds", "gauge",
         "Age of the oldest journaled record not yet applied to the replica.",
         [({"volume": v["name"]}, v["lag_s"]) for v in vols]),
        ("rephub_volume_lag_bytes", "gauge", "Bytes journaled, not yet applied to the replica.",
         [({"volume": v["name"]}, v["lag_bytes"]) for v in vols]),
        ("rephub_volume_state", "gauge", "1 for the volume's state, 0 for the others.",
         [({"volume": v["name"], "state": s.value}, v["state"] == s.value)
          for v in vols for s in VolState]),
        ("rephub_volume_attached", "gauge", "1 if the volume's agent has it attached.",
         [({"volume": v["name"]}, v["attached"]) for v in vols]),
        ("rephub_volume_size_bytes", "gauge", "Volume size.",
         [({"volume": v["name"]}, v["size"]) for v in vols]),
        ("rephub_sync_running", "gauge", "1 while a sync of the volume runs.",
         [({"volume": v["name"]}, bool(v["sync"] and v["sync"].get("running"))) for v in vols]),
        ("rephub_sync_done_bytes", "gauge", "Bytes of the current or last sync done.",
         [({"volume": v["name"], "plan": sy["plan"]}, sy["bytes_done"]) for v, sy in syncs]),
        ("rephub_sync_total_bytes", "gauge", "Bytes the current or last sync covers.",
         [({"volume": v["name"], "plan": sy["plan"]}, sy["bytes_total"]) for v, sy in syncs]),
        ("rephub_agents_connected", "gauge", "Authenticated agent connections.",
         [({}, len(st["agents"]))]),
        ("rephub_agent_rtt_seconds", "gauge", "Round trip of the last heartbeat PING.",
         [({"agent": a["agent_id"]}, None if a["rtt_ms"] is None else a["rtt_ms"] / 1e3)
          for a in st["agents"]]),
        ("rephub_journal_fdatasyncs_total", "counter", "fdatasync calls on the journal.",
         [({}, j["fdatasyncs"])]),
        ("rephub_journal_bytes", "gauge", "Size of the journal segments on disk.",
         [({}, j["bytes"])]),
        ("rephub_journal_span_seconds", "gauge", "Time between the oldest and newest record: "
         "how far back a point in time can be.", [({}, j["span_s"])]),
        ("rephub_recovery_sessions", "gauge", "Open recovery sessions.",
         [({}, len(st.get("sessions", ())))]),
        ("rephub_errors_total", "counter", "Faults logged at WARNING, by kind.",
         [({"kind": k}, n) for k, n in sorted(errors.items())]),
        ("rephub_degraded", "gauge", "1 while the hub's storage suffers the fault (volume "
         "\"\": the whole hub).",
         [({"fault": f.value, "volume": ""}, any(d["fault"] == f.value and d["volume"] is None
                                                 for d in st.get("degraded", ())))
          for f in Fault]
         + [({"fault": d["fault"], "volume": d["volume"]}, 1)
            for d in st.get("degraded", ()) if d["volume"] is not None]),
    ])


class ControlServer:
    """``DIR/control.sock``: one JSON request line in, JSON lines out, then close.

    Requests: ``{"cmd": "status"}``, ``{"cmd": "points", "volume": V}``,
    ``{"cmd": "checkpoint", "volume": V, "name": N}``, ``{"cmd": "export",
    "volume": V, "at": POINT, "output": ABSOLUTE_PATH}``, ``{"cmd": "verify",
    "volume": V, "repair": BOOL}`` (``Hub.verify``), ``{"cmd": "promote",
    "volume": V, "at": POINT}``, ``{"cmd": "release", "volume": V}``,
    ``{"cmd": "reseed", "volume": V}`` (``Hub.reseed``); export
    takes ``"set_aside": true`` for the history a promotion set aside.  Replies: for
    export and verify zero or more ``{"progress": done, "total": size}`` lines, then
    always ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": text,
    "code": ErrorCode name}``.

    ``{"cmd": "failback", "volume": V, "to": AGENT_ID}`` (``Hub.failback``) is a
    conversation: the hub sends ``{"phase": P, "message": text}`` as each phase
    starts and ``{"phase": P, "progress": done, "total": n}`` lines, then
    ``{"report": {...}}``; the client answers one line ``{"confirm": true}``
    (or false: the fail-back is abandoned); then progress lines and the final
    ``{"ok": ...}`` line, whose result has ``"outcome": "done"`` or ``"abandoned"``.

    Threads::

        dispatch             control-N
        close                main
    """

    def __init__(self, hub: Hub):
        self.hub = hub
        self.path = os.path.join(hub.store.dir, CONTROL_SOCKET)
        if os.path.exists(self.path):
            os.unlink(self.path)  # left by a killed hub; the store lock proves it is gone
        if len(os.fsencode(self.path)) >= 108:  # sun_path
            raise StoreError(f"control socket path {self.path} is longer than a unix "
                             "socket allows (107 bytes); use a shorter --data path")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self.sock.listen(8)
        self.stop_event = threading.Event()
        self.requests: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._loop, name="control", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        """Control thread: accept (``accept_forever``); each request runs in its
        own short thread."""
        n = itertools.count(1)

        def start_one(client: socket.socket, _) -> bool:
            t = threading.Thread(target=self._serve, args=(client,), name=f"control-{next(n)}",
                                 daemon=True)
            t.start()
            self.requests = [r for r in self.requests if r.is_alive()] + [t]
            return True
        accept_forever(self.sock, self.stop_event, start_one, self.hub.accept_log,
                       "control request")

    def _serve(self, client: socket.socket) -> None:
        """Control request thread."""
        with client:
            out = client.makefile("wb")
            reader = client.makefile("rb")

            def emit(obj):
                out.write(json.dumps(obj).encode() + b"\n")
                out.flush()

            def ask(obj, timeout: float):
                """Send ``obj``, return the client's one-line JSON answer (None: none
                within ``timeout``, or the hub is stopping)."""
                emit(obj)
                deadline = time.monotonic() + timeout
                while not select.select([client], [], [], POLL_INTERVAL)[0]:
                    if self.stop_event.is_set() or time.monotonic() > deadline:
                        return None
                client.settimeout(10)
                try:
                    answer = reader.readline(64 * 1024)
                except OSError:
                    return None
                finally:
                    client.settimeout(None)
                try:
                    return json.loads(answer) if answer else None
                except ValueError:
                    return None
            try:
                client.settimeout(10)
                line = reader.readline(64 * 1024)
                client.settimeout(None)
                req = json.loads(line)
                result = self.dispatch(req, emit, ask)
                reply = dict(ok=True, result=result)
            except p.ReplicationError as err:
                reply = dict(ok=False, error=str(err), code=p.ErrorCode(err.code).name)
            except (ValueError, KeyError, TypeError, StoreError, OSError) as err:
                reply = dict(ok=False, error=f"{type(err).__name__}: {err}", code="INVALID")
            try:
                out.write(json.dumps(reply).encode() + b"\n")
                out.flush()
            except OSError:
                pass

    def dispatch(self, req: dict, emit, ask=None):
        cmd = req["cmd"]
        store = self.hub.store
        if cmd == "status":
            return self.hub.status()
        vol = store.volume(req["volume"])
        if vol is None:
            raise p.RequestError(f"no volume named {req['volume']!r}",
                                 code=p.ErrorCode.NO_SUCH_VOLUME)
        if cmd == "points":
            return store.window.points(vol)
        if cmd == "checkpoint":
            return self.hub.checkpoint(vol.name, req["name"])
        if cmd == "verify":
            return self.hub.verify(vol.name, bool(req.get("repair")),
                                   lambda done, total: emit(dict(progress=done, total=total)))
        if cmd == "export":
            return export_volume(store, vol, req["at"], req["output"],
                                 lambda done, total: emit(dict(progress=done, total=total)),
                                 set_aside=bool(req.get("set_aside")))
        if cmd == "promote":
            return self.hub.recovery.promote(vol.name, req["at"])
        if cmd == "release":
            return store.roles.release_set_aside(vol)
        if cmd == "reseed":
            return self.hub.reseed(vol.name)
        if cmd == "failback":
            def confirm(report) -> bool:
                answer = ask(dict(report=report), FAILBACK_CONFIRM_TIMEOUT) if ask else None
                return isinstance(answer, dict) and answer.get("confirm") is True
            return self.hub.failback(vol.name, str(req["to"]), emit, confirm)
        raise ValueError(f"unknown command {cmd!r}")

    def close(self, grace: float = 30.0) -> None:
        """Stop accepting; let running requests (an export) finish before the store closes."""
        self.stop_event.set()
        self.thread.join(timeout=5)
        self.sock.close()
        deadline = time.monotonic() + grace
        for t in self.requests:
            t.join(timeout=max(deadline - time.monotonic(), 0.1))
            if t.is_alive():
                log.warning("control request %s still running at shutdown", t.name)
        try:
            os.unlink(self.path)
        except OSError:
            pass


def export_volume(store: VolumeStore, vol: Volume, at: str, output: str, progress=None,
                  set_aside: bool = False) -> dict:
    seq, t_ns = store.window.resolve_point(vol, at, set_aside=set_aside)
    last = [0.0]

    def report(done, total):
        now = time.monotonic()
        if progress and (now - last[0] > 0.5 or done == total):
            last[0] = now
            progress(done, total)
    if set_aside:
        written = store.window.export_set_aside(vol, seq, output, report)
    else:
        written = store.window.export(vol, seq, output, report)
    log.info("exported %s at %s (seq %d) to %s: %s of data", vol.name, at, seq, output,
             fmt_bytes(written))
    return dict(volume=vol.name, point=at, seq=seq, time=fmt_time_ns(t_ns), output=output,
                size=vol.size, data_bytes=written)


# ---------------------------------------------------------------------------
# Command line


#: Control commands that may run for long (whole-volume work) wait as long
#: as they need; every other answer must come within QUICK_REPLY seconds, so
#: `status` against a hung (SIGSTOPped) hub fails instead of hanging.
LONG_CONTROL_COMMANDS = frozenset({"export", "verify", "promote", "failback"})
QUICK_REPLY = 30.0


def control_request(data_dir: str, req: dict, on_line=None, timeout: float = 5.0):
    """Send one request to a running hub; return its result (raises on failure).

    ``timeout`` bounds the connect; the answer is bounded by QUICK_REPLY
    unless the command is one of LONG_CONTROL_COMMANDS.  Each line before the
    answer goes to ``on_line``; a dict it returns is sent back as one JSON line
    (``failback``'s confirmation).  Raises
    FileNotFoundError/ConnectionRefusedError when no hub runs on ``data_dir``,
    TimeoutError when a running hub does not answer in time.
    """
    path = os.path.join(os.path.abspath(data_dir), CONTROL_SOCKET)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.settimeout(None if req.get("cmd") in LONG_CONTROL_COMMANDS else QUICK_REPLY)
        s.sendall(json.dumps(req).encode() + b"\n")
        for line in s.makefile("rb"):
            obj = json.loads(line)
            if "ok" not in obj:
                back = on_line(obj) if on_line else None
                if back is not None:
                    s.sendall(json.dumps(back).encode() + b"\n")
                continue
            if not obj["ok"]:
                raise CommandError(f"{obj.get('code')}: {obj['error']}")
            return obj["result"]
    raise CommandError("the hub closed the control connection without an answer")


class CommandError(Exception):
    """A CLI command failed; the message is for the operator."""


def volume_state_words(v: dict) -> str:
    """What a volume's state means for an operator (the JSON keeps ``state``)."""
    running = bool(v["sync"] and v["sync"].get("running"))
    fb = v.get("failback")
    if fb and FailbackPhase(fb["phase"]).running:
        return "failing back"
    if v.get("role") == Role.PROMOTED:
        return "promoted, demoted agent attached" if v.get("demoted") else "promoted"
    if v.get("degraded"):
        return "degraded: " + ", ".join(sorted({d["fault"] for d in v["degraded"]}))
    if v["state"] == VolState.CONSISTENT.value:
        return "consistent"
    if v["state"] == VolState.SYNCING.value:
        return "resyncing" if running else "resync pending"
    return "initial sync" if running else "never synced"


def format_status(st: dict) -> str:
    j = st["journal"]
    lines = [f"hub {st['hub_id']} on {st['listen']}{' (TLS)' if st['tls'] else ''}, "
             f"up since {st['started']}",
             f"journal: seq {j['first_seq']}..{j['last_seq']} (durable {j['durable_seq']}, "
             f"applied {j['applied_seq']}), {fmt_bytes(j['bytes'])} + undo "
             f"{fmt_bytes(j['undo_bytes'])}, span {j['span_s']:.0f} s "
             f"[{j['oldest'] or '-'} .. {j['newest'] or '-'}], {j['fdatasyncs']} fdatasyncs"]
    for d in j.get("damage", ()):
        lines.append(f"DAMAGED at rest: {d['file']} bytes {d['start']}..{d['end']} "
                     f"({d['problem']}); later records kept; copy in {d['copy']}")
    for d in st.get("degraded", ()):
        lines.append(f"DEGRADED: {d['fault']}{' on volume ' + d['volume'] if d['volume'] else ''}"
                     f" since {d['since']}: {d['detail']}")
    lines.append("")
    rows = []
    for v in st["volumes"]:
        sync = v["sync"]
        if sync and sync.get("running"):
            eta = "-" if sync["eta_s"] is None else f"{sync['eta_s']:.0f} s"
            text = (f"{sync['plan']} {sync['percent']:5.1f}% {fmt_bytes(sync['bytes_done'])}"
                    f" of {fmt_bytes(sync['bytes_total'])} at {fmt_bytes(sync['rate'])}/s,"
                    f" ETA {eta}")
        elif sync:
            text = f"{sync['plan']} done" if not sync.get("error") else \
                f"{sync['plan']} failed: {sync['error']}"
        else:
            text = "-"
        rows.append([v["name"], v["owner"], volume_state_words(v),
                     "attached" if v["attached"] else "detached", fmt_bytes(v["size"]),
                     f"{v['lag_s']:.1f} s", fmt_bytes(v["lag_bytes"]),
                     fmt_bytes(v.get("replicated_bytes", 0)), text])
    if rows:
        lines += format_table(["VOLUME", "OWNER", "STATE", "LINK", "SIZE", "LAG",
                               "LAG BYTES", "REPLICATED", "SYNC"], rows, right=(4, 5, 6, 7))
    else:
        lines.append("(no volumes)")
    lines.append("")
    rows = [[a["agent_id"], a["address"], a["connected_since"],
             "-" if a["rtt_ms"] is None else f"{a['rtt_ms']:.2f} ms",
             ", ".join(a["volumes"]) or "-"] for a in st["agents"]]
    if rows:
        lines += format_table(["AGENT", "ADDRESS", "CONNECTED SINCE", "RTT", "VOLUMES"],
                              rows, right=(3,))
    else:
        lines.append("(no agents connected)")
    for v in st["volumes"]:
        fb = v.get("failback")
        if fb:
            total = fb["total_bytes"]
            pct = f" {100.0 * fb['done_bytes'] / total:5.1f}% ({fmt_bytes(fb['done_bytes'])} of " \
                  f"{fmt_bytes(total)})" if total else ""
            lines.append(f"fail-back of {v['name']} to {fb['to']} (since {fb['started']}): "
                         f"{fb['phase']}{pct}; delta {fmt_bytes(fb['delta_bytes'])}, sent "
                         f"{fmt_bytes(fb['sent_bytes'])}, late writes "
                         f"{fmt_bytes(fb['late_writes_bytes'])}"
                         + (f"; {fb['error']}" if fb["error"] else ""))
    for v in st["volumes"]:
        sc = v.get("last_scrub")
        if sc:
            lines.append(f"scrub of {v['name']}: {sc['time']}, "
                         + (f"{sc['damaged_chunks']} damaged chunks (resynced from the agent)"
                            if sc["damaged_chunks"] else "no damage")
                         + ("" if sc["complete"] else " (interrupted)"))
    for s in st.get("sessions", ()):
        lines.append(f"recovery: {s['mode']} session of {s['volume']} at {s['point']} (seq "
                     f"{s['seq']}) by {s['agent']} from {s['address']}, {s['writes']} writes")
    errors = {k: n for k, n in sorted(st.get("errors", {}).items()) if n}
    if errors:
        lines.append("warnings since start: " + ", ".join(f"{k} {n}" for k, n in errors.items())
                     + " (see the log)")
    return "\n".join(lines)


def format_points(pt: dict) -> str:
    lines = [f"volume {pt['volume']} (owner {pt['owner']}, {pt['state']})"]
    if pt["oldest"]:
        lines.append(f"window: {pt['oldest']['time']} (seq {pt['oldest']['seq']}) .. "
                     f"{pt['newest']['time']} (seq {pt['newest']['seq']})")
    else:
        lines.append("window: latest only (journal empty)")
    latest = pt.get("latest") or {}
    if latest.get("reason"):
        lines.append(f"latest: not recoverable now: {latest['reason']}")
    elif latest:
        lines.append(f"latest: recoverable (seq {latest['seq']})")
    for cp in pt["checkpoints"]:
        lines.append(f"checkpoint {cp['name']:<24} {cp['time']}  seq {cp['seq']}")
    for rs in pt.get("resyncs", ()):
        end = rs["consistent_from_seq"]
        lines.append(f"not recoverable: seq {rs['after_seq'] + 1}.."
                     f"{'now' if end is None else end - 1} (resync)")
    for pr in pt.get("promotions", ()):
        aside = (f"set aside: seq {pr['set_aside_from']}..{pr['set_aside_to']}"
                 f"{'' if pr.get('kept', True) else ' (released)'}"
                 if pr["set_aside_from"] <= pr["set_aside_to"] else "nothing set aside")
        lines.append(f"promoted at {pr['point']} (seq {pr['point_seq']}) on {pr['time']}; "
                     + aside)
    for cp in pt.get("unrecoverable", ()):
        lines.append(f"  checkpoint {cp['name']} (seq {cp['seq']}): {cp['reason']}")
    return "\n".join(lines)


def hub_running(data_dir: str) -> bool:
    try:
        control_request(data_dir, {"cmd": "status"}, timeout=2)
        return True
    except (OSError, CommandError):
        return False


def open_offline(data_dir: str) -> VolumeStore:
    if not os.path.isdir(data_dir):
        raise CommandError(f"no data directory {data_dir}")
    store = VolumeStore(data_dir)
    store.open()
    store.applier.replay()
    return store


def cmd_serve(args) -> int:
    host, _, port = args.listen.rpartition(":")
    hub = Hub(args.data, args.agents, (host.strip("[]") or "0.0.0.0", int(port)),
              args.tls_cert, args.tls_key, args.sync_rate, args.journal_retention,
              args.journal_max_bytes, args.journal_segment_bytes, heartbeat=args.heartbeat,
              metrics_listen=args.metrics_listen, scrub_interval=args.scrub_interval,
              scrub_rate=args.scrub_rate, handshake_timeout=args.handshake_timeout,
              max_connections=args.max_connections,
              max_unauthenticated_per_address=args.max_unauthenticated_per_address)
    stop = threading.Event()
    signals = []

    def on_signal(signum, frame):
        signals.append(signum)
        if len(signals) > 1:
            # Second signal: leave now.  The journal is append-only with a CRC per
            # record and metadata is replaced atomically, so nothing is corrupted.
            os.write(2, b"rephub: second signal, exiting at once\n")
            os._exit(128 + signum)
        stop.set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    hub.start()
    print_line(f"rephub listening on {hub.address[0]}:{hub.address[1]}")
    while not stop.wait(1.0):
        pass
    log.info("signal %s received", signal.Signals(signals[0]).name)
    hub.shutdown()
    return 0


def cmd_add_agent(args) -> int:
    if args.secret_out is None:
        print(add_agent(args.agents, args.agent_id, args.recover_for or ()))
        return 0
    # The secret file is created first, 0600 and exclusively, so an existing
    # file is never overwritten and a failure leaves the agents file as it was.
    try:
        fd = os.open(args.secret_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        raise CommandError(f"--secret-out {args.secret_out} exists; remove it or choose "
                           "another file (it is never overwritten)") from None
    try:
        secret = add_agent(args.agents, args.agent_id, args.recover_for or ())
        os.write(fd, f"{secret}\n".encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(args.secret_out)
        raise
    os.close(fd)
    print(f"agent {args.agent_id} added to {args.agents}; its secret is in {args.secret_out} "
          "(mode 0600): copy it to the protected host for --secret-file", file=sys.stderr)
    return 0


def cmd_status(args) -> int:
    def fetch():
        try:
            return control_request(args.data, {"cmd": "status"})
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise CommandError(f"no hub is running on {args.data} ({err})") from err
        except TimeoutError as err:
            raise CommandError(f"the hub on {args.data} does not answer within "
                               f"{QUICK_REPLY:.0f} s (stopped or overloaded?)") from err
    if args.watch is not None:
        try:
            return watch(fetch, format_status, args.watch, args.json, (CommandError, OSError))
        except ValueError as err:  # the interval
            raise CommandError(str(err)) from None
    st = fetch()
    print(json.dumps(st, indent=1) if args.json else format_status(st))
    return 0


def through_hub_or_store(args, req: dict, offline, **request_options):
    """Run a volume command through the running hub's control socket, or, when
    no hub runs on ``args.data``, as ``offline(store, volume)`` on the store
    opened (and locked) here.  Refusals become CommandErrors either way."""
    if hub_running(args.data):
        return control_request(args.data, req, **request_options)
    store = open_offline(args.data)
    try:
        vol = store.volume(args.volume)
        if vol is None:
            raise CommandError(f"no volume named {args.volume!r} in {args.data}")
        try:
            return offline(store, vol)
        except p.ReplicationError as err:
            raise CommandError(f"{p.ErrorCode(err.code).name}: {err}") from err
    finally:
        store.close()


def cmd_points(args) -> int:
    pt = through_hub_or_store(args, {"cmd": "points", "volume": args.volume},
                              lambda store, vol: store.window.points(vol))
    print(json.dumps(pt, indent=1) if args.json else format_points(pt))
    return 0


def cmd_checkpoint(args) -> int:
    p.validate_name(args.name, "checkpoint name")

    def offline(store, vol):
        rec = store.append_checkpoint(vol.owner, args.name)
        store.journal.log.do_sync(store.journal.log.take_sync_work())
        store.journal.durable_seq = rec.seq
        return dict(name=args.name, agent=vol.owner, seq=rec.seq, time=fmt_time_ns(rec.time_ns))

    cp = through_hub_or_store(
        args, {"cmd": "checkpoint", "volume": args.volume, "name": args.name}, offline)
    print(f"checkpoint {cp['name']} of agent {cp['agent']} at seq {cp['seq']} ({cp['time']})")
    return 0


def cmd_export(args) -> int:
    output = os.path.abspath(args.output)

    def progress(done, total):
        print(f"\rexport: {100.0 * done / total:5.1f}% ({fmt_bytes(done)} of "
              f"{fmt_bytes(total)})", end="" if done < total else "\n", file=sys.stderr,
              flush=True)
    res = through_hub_or_store(
        args, {"cmd": "export", "volume": args.volume, "at": args.at, "output": output,
               "set_aside": args.set_aside},
        lambda store, vol: export_volume(store, vol, args.at, output, progress,
                                         set_aside=args.set_aside),
        on_line=lambda o: progress(o["progress"], o["total"]))
    print(f"exported {res['volume']} at {res['point']} (seq {res['seq']}, {res['time']}) "
          f"to {res['output']}: {fmt_bytes(res['size'])}, {fmt_bytes(res['data_bytes'])} of data")
    return 0


def cmd_promote(args) -> int:
    """Promote a volume at a point: through the running hub, or offline."""
    def offline(store, vol):
        seq, _ = store.window.resolve_point(vol, args.at)
        return store.roles.promote(vol, seq, args.at)

    res = through_hub_or_store(args, {"cmd": "promote", "volume": args.volume, "at": args.at},
                               offline, timeout=10)
    aside = (f"journal entries {res['set_aside_from']}..{res['set_aside_to']} set aside"
             if res["set_aside_from"] <= res["set_aside_to"] else "nothing newer to set aside")
    print(f"promoted {res['volume']} at {res['point']} (seq {res['seq']}); {aside}; writes "
          "of the protected side are refused from now on")
    return 0


def cmd_release(args) -> int:
    """Let retention drop the journal entries set aside by a volume's promotions."""
    n = through_hub_or_store(args, {"cmd": "release", "volume": args.volume},
                             lambda store, vol: store.roles.release_set_aside(vol))
    print(f"{args.volume}: set-aside entries of {n} promotions released to retention")
    return 0


def cmd_reseed(args) -> int:
    """Accept another disk for a volume at its next ATTACH (VO-8)."""
    def offline(store, vol):
        vol.update(reseed=True)
        return dict(volume=vol.name, owner=vol.owner, reconnected=0)

    res = through_hub_or_store(args, {"cmd": "reseed", "volume": args.volume}, offline)
    print(f"{res['volume']}: the next attach of agent {res['owner']} may bring another disk "
          "identity; the replica is verified against that disk and becomes it"
          + (f" ({res['reconnected']} refused connection(s) closed to attach again)"
             if res["reconnected"] else ""))
    return 0


def cmd_verify(args) -> int:
    """Online verify through the running hub; exit 0 if identical (or repaired), 2 if not."""
    if not hub_running(args.data):
        raise CommandError(f"no hub is running on {args.data}: verify compares over the "
                           "live agent connection")

    def progress(o):
        if o["total"]:
            print(f"\rverify: {100.0 * o['progress'] / o['total']:5.1f}%", end="",
                  file=sys.stderr, flush=True)
    res = control_request(args.data, {"cmd": "verify", "volume": args.volume,
                                      "repair": args.repair}, on_line=progress, timeout=10)
    print("", file=sys.stderr)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for d in res["differing"]:
            print(f"differs: offset {d['offset']} length {d['length']}")
        print(f"verified {res['volume']}: {res['chunks']} chunks of {fmt_bytes(res['chunk_size'])}"
              f", {len(res['differing'])} differing ranges ({fmt_bytes(res['differing_bytes'])})"
              f"{', repaired' if res['repaired'] else ''}, {fmt_bytes(res['bytes_fetched'])} "
              f"fetched in {res['seconds']:.1f} s")
    return 0 if res["repaired"] or not res["differing"] else 2


def format_failback_report(r: dict) -> str:
    """The fail-back report the operator confirms (``Failback.report``)."""
    def extents(ext: list, count: int) -> str:
        shown = ", ".join(f"{o}+{n}" for o, n in ext[:8])
        return f" [{shown}{', ...' if count > 8 else ''}]" if ext else ""
    sa, lw, rw, d = r["set_aside"], r["late_writes"], r["recovery_writes"], r["delta"]
    lines = [f"fail-back of {r['volume']} to agent {r['agent']}:"]
    lines.append(f"  set aside at the promotion: {sa['records']} journal records, "
                 f"{sa['extent_count']} extents, {fmt_bytes(sa['bytes'])}"
                 f"{extents(sa['extents'], sa['extent_count'])}; kept, exportable with "
                 f"rephub.py export --set-aside (fail-back never releases them)")
    if lw["known"]:
        lines.append(f"  late writes at the original site, never received: "
                     f"{lw['extent_count']} extents, {fmt_bytes(lw['bytes'])}"
                     f"{extents(lw['extents'], lw['extent_count'])}")
    else:
        lines.append(f"  late writes: unknown (no trustworthy bitmap: {lw['why_unknown']}): "
                     f"{lw['extent_count']} extents differ, {fmt_bytes(lw['bytes'])}"
                     f"{extents(lw['extents'], lw['extent_count'])}")
    lines.append(f"    saved in {lw['image']} (+ {LATE_WRITES_JSON}); the fail-back "
                 "overwrites them at the original site")
    lines.append(f"  written at the recovery site since the promotion: {rw['extent_count']} "
                 f"extents, {fmt_bytes(rw['bytes'])}")
    lines.append(f"  delta to send: {d['extent_count']} extents, {fmt_bytes(d['bytes'])}"
                 f"{extents(d['extents'], d['extent_count'])}")
    return "\n".join(lines)


def cmd_failback(args) -> int:
    """Bring a promoted volume home: the hub sends the delta to the original agent
    after the operator confirmed the report.  Exit 0 done, 1 refused/failed/declined."""
    if not hub_running(args.data):
        raise CommandError(f"no hub is running on {args.data}: a fail-back talks to the "
                           "original agent over its live connection")

    def out(obj):
        if args.json:
            print(json.dumps(obj), flush=True)

    def on_line(o):
        if "report" in o:
            out(o)
            if not args.json:
                print(format_failback_report(o["report"]), flush=True)
            return {"confirm": confirm()}
        if "message" in o:
            print(f"fail-back: {o['phase']}: {o['message']}", file=sys.stderr, flush=True)
        elif o.get("total"):
            print(f"fail-back: {o['phase']}: {100.0 * o['progress'] / o['total']:5.1f}% "
                  f"({fmt_bytes(o['progress'])} of {fmt_bytes(o['total'])})", file=sys.stderr,
                  flush=True)
        return None

    def confirm() -> bool:
        if args.yes:
            return True
        if not sys.stdin.isatty():
            print("fail-back: stdin is not a terminal and --yes was not given: declining",
                  file=sys.stderr, flush=True)
            return False
        print('Type "yes" to overwrite the late writes at the original site and fail back: ',
              end="", file=sys.stderr, flush=True)
        return sys.stdin.readline().strip() == "yes"

    res = control_request(args.data, {"cmd": "failback", "volume": args.volume,
                                      "to": args.to}, on_line=on_line, timeout=10)
    out({"result": res})
    if res["outcome"] != "done":
        print(f"{res['message']}", file=sys.stderr)
        return 1
    if not args.json:
        lw = res["late_writes"]
        print(f"failed back {res['volume']} to agent {res['agent']}: delta "
              f"{fmt_bytes(res['delta_bytes'])}, {fmt_bytes(res['sent_bytes'])} sent, late writes "
              f"{fmt_bytes(lw['bytes'])} saved in {res['late_writes_dir']}, "
              f"{res['seconds']:.1f} s; protection from {res['agent']} resumes")
    return 0


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds > 0")
    return value


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rephub.py", description=__doc__.split("\n")[0])
    ap.add_argument("--log-level", default="INFO",
                    choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the hub")
    s.add_argument("--data", required=True, help="data directory")
    s.add_argument("--listen", required=True, help="HOST:PORT")
    s.add_argument("--agents", required=True, help="agents file (see add-agent)")
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--sync-rate", type=float, default=0,
                   help="bytes/s for sync reads, 0 = no limit")
    s.add_argument("--journal-retention", type=float, default=DEFAULT_RETENTION, help="seconds")
    s.add_argument("--journal-max-bytes", type=int, default=DEFAULT_MAX_JOURNAL_BYTES,
                   metavar="BYTES",
                   help="drop applied journal segments while journal and undo exceed this "
                        f"(default {DEFAULT_MAX_JOURNAL_BYTES // 2**30} GiB); up to "
                        f"{SPARE_BYTES // 2**30} GiB of dropped segments are kept beyond it "
                        f"as spares, written over by the next segments, while 1/"
                        f"{SPARE_FREE_FRACTION} of the file system stays free")
    s.add_argument("--journal-segment-bytes", type=int, default=SEGMENT_BYTES, metavar="BYTES",
                   help=f"start a new journal segment file at this size (default "
                        f"{SEGMENT_BYTES // 2**20} MiB); retention drops whole segments, so "
                        "a small data disk wants small segments")
    s.add_argument("--scrub-interval", type=float, default=DEFAULT_SCRUB_INTERVAL,
                   metavar="SECONDS", help="read every replica this often and check it against "
                   f"its checksums (default {DEFAULT_SCRUB_INTERVAL:g}; 0 = never); rot found is "
                   "resynced from the agent")
    s.add_argument("--scrub-rate", type=float, default=DEFAULT_SCRUB_RATE, metavar="BYTES",
                   help=f"the scrub reads at most this many bytes/s (default "
                        f"{DEFAULT_SCRUB_RATE // 2**20} MiB/s)")
    s.add_argument("--metrics-listen", type=parse_host_port, metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics")
    s.add_argument("--heartbeat", type=positive_seconds, default=HEARTBEAT_INTERVAL,
                   metavar="SECONDS",
                   help=f"PING every connection this often (default {HEARTBEAT_INTERVAL:g}); "
                        f"one silent for {PEER_SILENCE_INTERVALS} intervals is closed")
    s.add_argument("--handshake-timeout", type=positive_seconds, default=HANDSHAKE_TIMEOUT,
                   metavar="SECONDS", help="close a connection not authenticated this long "
                   f"after accept, TLS included (default {HANDSHAKE_TIMEOUT:g})")
    s.add_argument("--max-connections", type=positive_int, default=MAX_CONNECTIONS,
                   metavar="N", help="connections held at most; more are closed at accept "
                   f"(default {MAX_CONNECTIONS})")
    s.add_argument("--max-unauthenticated-per-address", type=positive_int,
                   default=MAX_UNAUTHENTICATED_PER_ADDRESS, metavar="N",
                   help="connections from one address still in the handshake, at most "
                        f"(default {MAX_UNAUTHENTICATED_PER_ADDRESS})")
    s.set_defaults(func=cmd_serve)
    s = sub.add_parser("add-agent", help="add an agent, print its new secret")
    s.add_argument("--agents", required=True)
    s.add_argument("agent_id")
    s.add_argument("--secret-out", metavar="FILE",
                   help="write the secret to FILE (created 0600; refused if it exists) "
                        "instead of printing it")
    s.add_argument("--recover-for", action="append", metavar="OWNER",
                   help="it may also recover the volumes of agent OWNER (* = any); repeatable")
    s.set_defaults(func=cmd_add_agent)
    s = sub.add_parser("status", help="ask the running hub")
    s.add_argument("--data", required=True)
    add_status_options(s)
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("points", help="list a volume's points in time")
    s.add_argument("--data", required=True)
    s.add_argument("volume")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_points)
    s = sub.add_parser("checkpoint", help="add a named point for a volume's agent")
    s.add_argument("--data", required=True)
    s.add_argument("volume")
    s.add_argument("name")
    s.set_defaults(func=cmd_checkpoint)
    s = sub.add_parser("export", help="write a volume at a point as a sparse raw image")
    s.add_argument("--data", required=True)
    s.add_argument("volume")
    s.add_argument("--at", default="latest",
                   help=f"latest | checkpoint name | RFC 3339 UTC time ({POINT_EXAMPLE})")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--set-aside", action="store_true",
                   help="export the history a promotion set aside, at a point inside it")
    s.set_defaults(func=cmd_export)
    s = sub.add_parser("promote", help="fail over: make a volume at a point its new history, "
                       "set newer journal entries aside, refuse the protected side's writes")
    s.add_argument("--data", required=True)
    s.add_argument("volume")
    s.add_argument("--at", required=True,
                   help=f"latest | checkpoint name | RFC 3339 UTC time ({POINT_EXAMPLE})")
    s.set_defaults(func=cmd_promote)
    s = sub.add_parser("release", help="let retention drop the entries set aside by promotions")
    s.add_argument("--data", required=True)
    s.add_argument("volume")
    s.set_defaults(func=cmd_release)
    s = sub.add_parser("reseed", help="let a volume's next attach bring another disk "
                       "(a replaced disk, or an agent whose state directory was lost)")
    s.add_argument("--data", required=True)
    s.add_argument("volume")
    s.set_defaults(func=cmd_reseed)
    s = sub.add_parser("verify", help="compare a volume with its agent's copy by checksums "
                       "(online, through the running hub)")
    s.add_argument("--data", required=True)
    s.add_argument("volume")
    s.add_argument("--repair", action="store_true", help="resync the differing chunks")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)
    s = sub.add_parser("failback", help="bring a promoted volume home: send the delta to its "
                       "original agent (attached DEMOTED), after a report you confirm",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="""\
Bring a promoted volume home to its original agent, sending only what differs.

Before: stop the VM at the original site and remove its QSD export, then run
`repagent.py protect ... --accept-failback` there (same --state-dir: its dirty
bitmap tells which writes the hub never received); it attaches the volume
DEMOTED.  Then, through the running hub:

  preparing   FAILBACK_BEGIN: the agent checks that nothing else can write
  collecting  the agent's dirty map (or, with no trustworthy map, checksums)
  preserving  the late writes read into DIR/volumes/VOLUME/failback-N/
  confirming  the report: set-aside entries, late writes, the delta; type yes
  applying    the recovery session fenced; the delta sent as PUTs
  finishing   FAILBACK_END: the volume is protected from AGENT_ID again, the
              recovery agent closed

Set-aside entries stay exportable (export --set-aside) until `release`.
Exit status: 0 done; 1 refused, failed or declined (nothing changed).""")
    s.add_argument("--data", required=True)
    s.add_argument("volume")
    s.add_argument("--to", required=True, metavar="AGENT_ID", help="the volume's owner")
    s.add_argument("--yes", action="store_true", help="confirm without asking")
    s.add_argument("--json", action="store_true", help="the report and the result as JSON "
                   "lines on stdout")
    s.set_defaults(func=cmd_failback)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --log-level is accepted before or after the command.
    level = "INFO"
    if "--log-level" in argv:
        i = argv.index("--log-level")
        if i + 1 < len(argv):
            level = argv[i + 1]
            del argv[i:i + 2]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(threadName)s: %(message)s")
    try:
        return args.func(args)
    except (CommandError, StoreError, p.ReplicationError, OSError, ssl.SSLError) as err:
        print(f"rephub.py {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
