#!/usr/bin/env python3
"""repagent: protect qemu-storage-daemon disks by streaming every guest write to rephub.

How a write travels (docs/DESIGN.md "Data flows")::

    guest --> QSD --active mirror, write-blocking--> NBD target (this agent)
                                                        | 1. mark the chunk in the
                                                        |    persistent dirty bitmap
                                                        | 2. queue WRITE/ZERO on the
                                                        v    one ordered hub stream
                                                      rephub --ACK--> bit cleared

Lock order, outermost first (a thread that holds two of these took the one on
the left first; what each thread takes: docs/DESIGN.md "Threads and locks")::

    QemuSide.mirror_lock → Stream.lock → Agent.error_lock

The agent never patches QEMU.  Over QMP it adds an NBD client node pointing
at its own NBD server and starts an active mirror (``sync: none``,
``copy-mode: write-blocking``), so each guest write completes only after the
agent has answered it (docs/QEMU.md "How a copy of every guest write leaves
QEMU").  What the answer promises depends on ``--mode``:

* ``sync``: the hub's ACK (durable at the hub), but never later than
  ``--sync-timeout``; past it the agent answers anyway, keeps the chunk
  marked, logs a WARNING and runs *degraded* (answers like async mode) until
  no chunk is left that only a resync can repair.
* ``async``: the chunk is marked; the write is sent in the background.  The
  send queue is bounded in bytes (``--max-queue``): when it is full the write
  is not queued, only marked, and the dropped regions are reported to the hub
  with an unsolicited DIRTY_MAP so that it resyncs them.  That DIRTY_MAP
  takes its place in the queue at the first dropped write, ahead of every
  later frame, and carries every region dropped until it is sent: the hub
  knows from where on the stream lacks a write (points there are not
  crash-consistent until the resync ends).

The rules this file implements (docs/DESIGN.md "The rules that make it
correct"; what they look like from outside: docs/SEMANTICS.md):

* Rule 2, pending IO is never forgotten: ``DirtyBitmap``.  One bit per chunk
  in a memory-mapped file, and for recently written chunks which of their
  4 KiB blocks are dirty in a second one, set *before* QEMU is answered.  In
  memory per block: the WRITE/ZERO frames queued over it and not ACKed, and
  the stream sequence number at which a write over it was dropped.  A block
  clears when nothing is in flight over it and no loss is left; a chunk's bit
  when none of its blocks is marked.  Every frame queued on the hub stream
  gets the next stream sequence number; a SYNCED for a reply queued at
  sequence ``s`` covering a block whole forgets its losses before ``s``.
* Rule 4, stale reads: a READ, CHECKSUM_QUERY or EXTENT_QUERY from the hub
  opens a *read window* over its range before reading QSD.  A guest write
  to a volume with an open window overlapping it (or with writes already
  held back) is marked and answered as usual, but its frame is held back
  and queued only after the window's reply.  So every write the read may
  not have seen is sent after the reply, and QEMU's write path never waits
  on a QSD read (a QSD read waiting on a guest write that waits on us
  cannot deadlock).
* Rule 5, QEMU is told the truth: the mirror job survives an agent restart
  and is resumed, never started twice; a job that vanished although the
  state dir says we had one means QSD restarted: the job is set up again and
  the volume attached as UNKNOWN, so the hub verifies it by checksums.

Fail-back (PROTOCOL.md "Fail-back"): once the hub has promoted a volume at
the recovery site it attaches it here as DEMOTED.  Guest writes are then only
marked in the bitmap, never sent.  When the operator runs ``rephub.py
failback`` the hub sends FAILBACK_BEGIN: if ``--accept-failback`` was given,
and QMP shows that nothing else can write the node, the agent tears its
mirror down and adds its own writable export ``repagent-fb-VOLUME`` on QSD's
NBD server (the one ``--source`` names).  Each PUT is marked dirty first, then
written through that export; FAILBACK_END(DONE) flushes, clears the marks
(the disk now equals the hub's volume), sets the mirror up again and the
volume streams as usual; ABORT, or a lost connection, keeps the marks and
stays DEMOTED.  How "nothing else can write" is decided, as measured on QSD
7.2 (``x-debug-query-block-graph``)::

    writable NBD export, even with no client   block-backend -> node, perm "write"
    read-only NBD export                       block-backend -> node, no "write"
    the mirror job (no writer above it)        filter -> node "consistent-read";
                                               the job's own edges hold no "write"
    an export while the mirror runs            block-backend -> filter, "write";
                                               filter -> node, "write"

so the writers of a node are the block-backends and block-jobs holding "write"
on it or on a filter above it that holds "write" on it (``node_writers``).

Threads (each named; stopped by ``Agent.stopping`` and joined with a timeout)::

    main                 set-up, then waits for SIGTERM/SIGINT, then drains
    repagent-heartbeat   ``HubLink``: the only thread that connects to the
                         hub: backoff, handshake, ATTACH every volume, PING,
                         hub-timeout
    repagent-send        (per connection) pops the send queue, sends frames
    repagent-recv        (per connection) sequential blocking recv loop,
                         dispatches to ``HubLink.on_<TYPE>``
    repagent-sync-N      ``SyncServer``: serves READ / CHECKSUM_QUERY /
                         EXTENT_QUERY / DIRTY_QUERY (never on the recv
                         loop, so ACKs keep flowing meanwhile)
    repagent-failback    ``FailbackWorker``: FAILBACK_BEGIN / PUT /
                         FAILBACK_END in arrival order (QMP and NBD work,
                         off the recv loop)
    repagent-timer       answers sync-mode writes whose ACK is late
    repagent-jobs        ``QemuSide``: watches the mirror jobs: resumes a
                         paused job, sets up again after a QSD restart
    repagent-control     serves ``status`` on the control socket
    repagent-metrics     ``--metrics-listen``: the same status as Prometheus
                         text on ``/metrics`` (``agent_metrics``)
    qmp-reader           reads QMP replies and events
    nbd-*                the NBD target (nbd.py), calls ``TargetHandler``

State directory (``--state-dir``; created 0700, every file and socket in it
0600 whatever the umask; an existing wider dir is named in a WARNING)::

    agent.lock           flock'ed by the running agent (one agent per dir)
    control.sock         status requests ("status\\n" -> one JSON document)
    VOLUME.bitmap        dirty bitmap: header (magic, chunk size, size,
                         generation), one bit per chunk, then a CRC per 4 KiB
                         of bits (damage => the volume attaches UNKNOWN), mmap'ed
    VOLUME.bitmap.fine   its second level: slots naming a marked chunk and its
                         dirty 4 KiB blocks, a CRC each (damage => that chunk
                         is resent whole), mmap'ed
    VOLUME.json          QEMU side: node, job and node names, whether a
                         mirror was set up, whether the hub must verify
                         (a damaged one is set aside as VOLUME.json.damaged
                         and the volume verified)
    VOLUME.nbd           unix socket of the NBD target QSD writes into

How the agent reads the protected volume for the hub: ``--source
NODE=URI`` with an NBD URI of QSD's export of that node
(``nbd+unix:///EXPORT?socket=PATH`` or ``nbd://HOST:PORT/EXPORT``); without
it, a node whose format is raw over a plain file is read from the image file
itself (through the page cache QSD shares).
"""

from __future__ import annotations

import argparse
import array
import collections
import contextlib
import dataclasses
import enum
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import queue
import random
import signal
import socket
import ssl
import stat
import struct
import sys
import threading
import time
import urllib.parse
import zlib
from typing import Callable, NamedTuple

import nbd
import protocol as p
from ops import (LogThrottle, MetricsServer, accept_forever, add_status_options, fmt_bytes,
                 format_table, parse_host_port, print_line, prometheus_text, watch)

log = logging.getLogger("repagent")

# ---------------------------------------------------------------------------
# Limits and defaults (each says why it is that big)

DEFAULT_CHUNK = 64 * 1024
"""Dirty-tracking granularity; also the mirror's granularity.  64 KiB keeps
the bitmap of a 1 TiB disk at 2 MiB while a resync re-sends little."""

DEFAULT_MAX_QUEUE = 64 * 1024 * 1024
"""Bytes of WRITE data queued for the hub before async mode starts dropping."""

DEFAULT_SYNC_TIMEOUT = 5.0
DEFAULT_HUB_TIMEOUT = 15.0
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_RECONNECT_DELAY = 5
"""QEMU's NBD client waits this long for the agent to come back before it
fails a target write (and the job pauses): long enough for an agent restart."""

BACKOFF_MIN = 0.2
BACKOFF_MAX = 5.0
"""Reconnect backoff bounds (seconds, doubling, with jitter); ``--max-backoff``
lowers the upper one (and the lower one with it, if it is lower still)."""

HEALTHY_CONNECTION = 2.0
"""A connection resets the reconnect backoff only once a volume has stayed
attached on it this long (seconds).  A hub that completes the handshake and
then fails (closes, or refuses ATTACH) is retried with the same growing
backoff as one that refuses the connection, not at once; one that attaches
and then closes costs at most one connection per this many seconds.  Short,
so that a hub restarted soon after the agent connected is not waited for."""

JOB_POLL_INTERVAL = 1.0
"""How often the mirror jobs are checked (and a paused job resumed)."""

SYNC_WORKERS = 2
"""Threads serving the hub's READs; each holds its own QSD reader."""

CHECKSUM_PIECE = 4 * 1024 * 1024
"""A CHECKSUM_QUERY range is read from QSD in pieces of at most this."""

MAX_SYNCED_MEMORY = 65536
"""Replies whose stream sequence we remember for a later SYNCED."""

MAX_EXTENTS = p.MAX_PAYLOAD // 16
"""A DIRTY_MAP carries 16 bytes per extent; longer maps are coarsened.  An
EXTENTS answer (16 bytes per extent too) is cut to a prefix of this many."""

AGENT_FEATURES = p.Feature.EXTENTS | p.Feature.FAILBACK
"""Feature bits protect mode offers (PROTOCOL.md "Feature bits"): EXTENTS
lets the hub's full sync ask which regions read as zeroes (EXTENT_QUERY);
FAILBACK lets a promoted volume attach DEMOTED and be failed back."""

QMP_TIMEOUT = 30.0
CONTROL_TIMEOUT = 5.0
MAX_UNIX_PATH = 107

FAILBACK_NBD_TIMEOUT = 60.0
"""One PUT's write into QSD, as for sync reads (NBDSource)."""

FAILBACK_STOP_TIMEOUT = 60.0
"""On SIGTERM mid fail-back: long enough to delete our export and set the
mirror up again (two QMP round trips and a job start)."""


def parse_size(text: str) -> int:
    """'65536', '64K', '64KiB', '1M', '2G' -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units else ""
    number = t[:-1] if unit else t
    try:
        value = int(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not a number with an "
                                         "optional K/M/G/T suffix") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return value


def check_unix_path(path: str, what: str) -> str:
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ValueError(f"{what} {path!r} is {len(os.fsencode(path))} bytes, a unix "
                         f"socket path holds at most {MAX_UNIX_PATH}: use a shorter "
                         "--state-dir")
    return path


# ---------------------------------------------------------------------------
# Private files (README "Configuration and security": another local user
# must not read the bitmaps or connect to the sockets, whatever the umask)

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def private_open(path: str, flags: int) -> int:
    """``os.open`` a file only its owner can read or write: created 0600
    whatever the umask, and narrowed to 0600 if it existed wider."""
    fd = os.open(path, flags | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, PRIVATE_FILE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_dir(path: str, what: str) -> None:
    """Create ``path`` 0700 (parents as the umask says), or warn if it exists
    with group or other permissions: its files and sockets are private, but
    the operator chose the directory's mode, so it is named, not changed."""
    try:
        os.makedirs(path, PRIVATE_DIR)
    except FileExistsError:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            log.warning("%s %s is open to group or others (mode %04o): chmod 700 %s",
                        what, path, mode, path)
        return
    os.chmod(path, PRIVATE_DIR)    # the umask may have taken owner bits away


def open_lockfile(state_dir: str):
    """agent.lock (0600), for flock: one agent per state dir."""
    return open(private_open(os.path.join(state_dir, "agent.lock"), os.O_RDWR | os.O_CREAT),
                "a+")


def listen_private_unix(sock: socket.socket, path: str, backlog: int) -> None:
    """bind, chmod 0600, then listen: nobody else can connect, even for a moment."""
    sock.bind(path)
    os.chmod(path, PRIVATE_FILE)
    sock.listen(backlog)


def read_secret_file(path: str) -> bytes:
    """The agent's secret, from a file only its owner can read (as ssh wants
    of a private key): group or other permissions are refused."""
    with open(path, encoding="ascii") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            for bits, how in ((0o044, "readable"), (0o022, "writable"), (0o011, "usable")):
                if mode & bits:
                    who = "others" if mode & bits & 0o007 else "its group"
                    break
            raise ValueError(f"secret file {path} is {how} by {who} (mode {mode:04o}): "
                             f"chmod 600 {path}")
        try:
            return p.parse_secret(f.read(4096))
        except ValueError as err:
            raise ValueError(f"secret file {path}: {err}") from err


# ---------------------------------------------------------------------------
# The persistent dirty bitmap (docs/SEMANTICS.md "Agent's dirty bitmap")

# VOLUME.bitmap, the first level: one bit per chunk.
# offset size field
#  0      8  magic        b"RPAGBMP1"
#  8      2  version      3 (2: the same, from before the second level existed;
#                         1: also without the block CRCs; both upgraded on open)
# 10      2  reserved     0
# 12      4  chunk_size
# 16      8  size         volume size in bytes
# 24     16  generation   random, created with the file (ATTACH.generation)
# 40     24  reserved     0
# 64      B  bits         B = ceil(chunks / 8); bit i of byte j is chunk 8*j+i
# 64+B  4*N  block CRCs   N = ceil(B / BITMAP_CRC_BLOCK); CRC-32 (zlib) of each
#                         BITMAP_CRC_BLOCK bytes of bits (the last one shorter),
#                         or BITMAP_CRC_CHANGING while the block's bits change
BITMAP_HEADER = struct.Struct("!8sHHIQ16s24x")
BITMAP_MAGIC = b"RPAGBMP1"
BITMAP_VERSION = 3
"""Version 3 has the layout of version 2; it says that VOLUME.bitmap.fine
beside it refines the marks, so that an agent that does not keep that file
up to date (one that knows version 2 only) refuses the bitmap rather than
leave the second level saying less than the first."""
BITMAP_VERSION_NO_FINE = 2
BITMAP_VERSION_NO_CRC = 1
BITMAP_CRC = struct.Struct("!I")
BITMAP_CRC_BLOCK = 4096
"""Bytes of bits one CRC covers: one page.  A change to a bit recomputes the
CRC of its 4 KiB only; the bitmap of a 1 TiB disk at 64 KiB chunks (2 MiB)
has 512 of them (2 KiB), all checked at start in a few milliseconds."""
BITMAP_CRC_CHANGING = 0xFFFFFFFF
"""A block's CRC while its bits change: stored before the first bit of the
block changes, replaced by the CRC when the change is sealed.  An agent that
dies in between leaves it, and the next open trusts that block as it is
rather than call it damage: only the bits of the operation in flight can
differ, a mark for a write not yet answered (QSD's mirror sends it again)
or a clear for data the hub has already made durable.  A block whose real
CRC is this value is trusted unchecked (one in 2**32)."""

# VOLUME.bitmap.fine, the second level: which 4 KiB blocks of a marked chunk
# are dirty, for up to FINE_SLOTS chunks at a time.
# offset size field
#  0      8  magic        b"RPAGFIN1"
#  8      2  version      1
# 10      2  reserved     0
# 12      4  chunk_size   as VOLUME.bitmap's
# 16      8  size         as VOLUME.bitmap's
# 24     16  generation   as VOLUME.bitmap's (the second level of another bitmap
#                         is never used)
# 40      4  slots        S
# 44      4  slot_size    L: a power of two, at least 12 + M
# 48     16  reserved     0
# 4096  S*L  slots        slot k at 4096 + k*L (each inside one page):
#                           0  8  chunk + 1 (0: the slot is free, all of it zero)
#                           8  4  CRC-32 (zlib) of bytes 0-7, then of the sub-bits
#                          12  M  sub-bits, M = ceil(chunk_size / 4096 / 8); bit i
#                                 of byte j is block 8*j+i of the chunk
FINE_HEADER = struct.Struct("!8sHHIQ16sII16x")
FINE_MAGIC = b"RPAGFIN1"
FINE_VERSION = 1
FINE_SLOT = struct.Struct("!QI")
FINE_BLOCK = p.MIN_CHUNK
"""The second level's block: 4 KiB, the smallest chunk PROTOCOL.md allows, and
the page and sector size guest file systems write in."""
FINE_TABLE_OFFSET = 4096
FINE_SLOTS = 65536
"""Chunks whose blocks the second level can tell apart at once (and at most
FINE_TABLE_MAX bytes of slots): 65536 scattered 4 KiB writes, 256 MiB of them,
are resent as written after an outage; writes beyond that mark whole chunks
until slots free up.  At 64 KiB chunks a slot is 16 bytes: 1 MiB in all."""
FINE_TABLE_MAX = 1024 * 1024
LOADED_SEQ = 1
"""The stream position a mark loaded from the files counts as lost at: every
reply of this run is queued later (the first at 2), so only a SYNCED clears it."""


class BitmapError(Exception):
    """A bitmap file that cannot be used (wrong magic, size or chunk size)."""


class Span(NamedTuple):
    """4 KiB blocks [first, end) of the volume (block b is bytes b*4096 ...)."""

    first: int
    end: int


class _Marks:
    """The in-memory state of one chunk, per 4 KiB block as bit masks (bit i is
    block i of the chunk): the blocks marked; the masks of its queued writes
    not ACKed yet, each with a count; and, per block, the stream position of
    its latest loss: ``lost`` holds the blocks whose latest loss is at
    ``seq`` (the chunk's latest), ``older`` those whose latest loss is at an
    earlier position (rare: while no hub is attached the position stays put).
    With its entry in ``DirtyBitmap.states``, about 250 bytes a chunk: the
    common case has no dict of its own.

    Threads::

        *                        any thread, with Stream.lock held (through DirtyBitmap)
    """

    __slots__ = ("marked", "flight", "seq", "lost", "older")

    def __init__(self, marked: int = 0, seq: int = 0, lost: int = 0):
        self.marked = marked
        self.flight: dict[int, int] | None = None   # mask of a queued write -> how many
        self.seq = seq
        self.lost = lost
        self.older: dict[int, int] | None = None    # earlier seq -> blocks lost last then

    def busy(self) -> int:
        """The blocks that may not clear: a write to them in flight, or lost."""
        mask = self.lost
        for m in self.flight or ():
            mask |= m
        for m in (self.older or {}).values():
            mask |= m
        return mask

    def has_loss(self) -> bool:
        return bool(self.lost or self.older)

    def latest_loss(self) -> int:
        return self.seq if self.lost else max(self.older)

    def lose(self, mask: int, seq: int) -> None:
        """The blocks ``mask`` were lost at ``seq``: their latest loss now.  Stream
        positions only grow; one earlier than ``self.seq`` counts as ``self.seq``
        (a later SYNCED is then needed: stricter, never weaker)."""
        seq = max(seq, self.seq)
        self._clear_older(mask, seq + 1)        # superseded by this loss
        if self.lost and seq > self.seq:
            keep = self.lost & ~mask            # still lost last at self.seq: older now
            if keep:
                self.older = self.older or {}
                self.older[self.seq] = keep
            self.lost = 0
        self.seq = seq
        self.lost |= mask

    def forgive(self, mask: int, seq: int) -> None:
        """A reply queued at ``seq`` covering ``mask`` whole is durable at the hub:
        the blocks' losses before ``seq`` are repaired."""
        if self.lost and self.seq < seq:
            self.lost &= ~mask
        self._clear_older(mask, seq)

    def _clear_older(self, mask: int, before: int) -> None:
        """Take ``mask`` out of the older losses at positions before ``before``."""
        for s in [s for s in self.older or () if s < before]:
            left = self.older[s] & ~mask
            if left:
                self.older[s] = left
            else:
                del self.older[s]
        if not self.older:
            self.older = None


def _runs(mask: int):
    """Yield (first, end) of each run of set bits of ``mask``, lowest first."""
    pos = 0
    while mask:
        skip = (mask & -mask).bit_length() - 1
        mask >>= skip
        pos += skip
        ones = (~mask & (mask + 1)).bit_length() - 1
        yield pos, pos + ones
        mask >>= ones
        pos += ones


class ChunkBits:
    """DirtyBitmap's first level, ``VOLUME.bitmap`` (layout above): one bit per
    chunk, memory-mapped, and a CRC-32 per BITMAP_CRC_BLOCK of bits in the
    same mapping, recomputed (``seal``) after the bits of a block change.
    Body damage (bits zeroed or flipped, the header intact) is told at open:
    ``damaged`` lists the blocks whose CRC fails, and the caller must not
    trust the marks (``Volume.open_bitmap``: the hub verifies the volume).
    A block left BITMAP_CRC_CHANGING (the agent died while its bits changed)
    is not damage: it is sealed as it is at open (``torn`` counts them).

    Opening makes the file (``created``) or checks a known one and upgrades
    an older version (``upgraded``: that version, else 0); the header that
    says the file is whole is written last, by ``commit``, after the CRCs
    (and, in DirtyBitmap, after the second level).

    Threads::

        commit                   main, at start (opening the DirtyBitmap)
        *                        any thread, with Stream.lock held (through DirtyBitmap)
    """

    def __init__(self, path: str, size: int, chunk_size: int):
        self.path = path
        self.size = size
        self.chunk_size = chunk_size
        self.chunks = -(-size // chunk_size)
        self.damaged: list[int] = []    # blocks whose CRC failed at open
        self.torn = 0                   # blocks found BITMAP_CRC_CHANGING at open
        self.stale: set[int] = set()    # blocks whose bits changed since their CRC
        self.upgraded = 0
        self.created = not os.path.exists(path)
        bits_size = -(-self.chunks // 8)
        self.crc_offset = BITMAP_HEADER.size + bits_size
        self.blocks = -(-bits_size // BITMAP_CRC_BLOCK)
        file_size = self.crc_offset + BITMAP_CRC.size * self.blocks
        fd = private_open(path, os.O_RDWR | os.O_CREAT)
        try:
            have = os.fstat(fd).st_size
            # Empty, or all zeroes: a creation that a crash cut short before
            # its header (written last) was written.  (Zeroes in the header
            # only are damage: refused below, as a bad magic.)
            header = os.pread(fd, BITMAP_HEADER.size, 0)
            if self.created or have == 0 or (have == file_size and not any(header)
                                             and not any(os.pread(fd, file_size, 0))):
                self.created = True
                self.generation = os.urandom(p.GENERATION_SIZE)
                os.ftruncate(fd, file_size)
            else:
                self.generation, version = self._check_header(header, have, file_size)
                if version != BITMAP_VERSION:
                    self.upgraded = version
                    os.ftruncate(fd, file_size)
            self.map = mmap.mmap(fd, file_size)
            self.bits = memoryview(self.map)[BITMAP_HEADER.size:self.crc_offset]
            if self.created or self.upgraded == BITMAP_VERSION_NO_CRC:
                self.seal(range(self.blocks))      # CRCs first, then the header
            else:
                stored = [self.stored_crc(b) for b in range(self.blocks)]
                torn = [b for b, crc in enumerate(stored) if crc == BITMAP_CRC_CHANGING]
                self.damaged = [b for b, crc in enumerate(stored)
                                if crc != BITMAP_CRC_CHANGING and self.block_crc(b) != crc]
                self.seal(torn)
                self.torn = len(torn)
        finally:
            os.close(fd)

    def commit(self) -> None:
        """Write the header of a new or upgraded file, last (after its CRCs)."""
        if not (self.created or self.upgraded):
            return
        self.map.flush()
        fd = private_open(self.path, os.O_RDWR)
        try:
            os.pwrite(fd, BITMAP_HEADER.pack(BITMAP_MAGIC, BITMAP_VERSION, 0, self.chunk_size,
                                             self.size, self.generation), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _check_header(self, raw: bytes, have: int, want: int) -> tuple[bytes, int]:
        """(generation, version) of a header that fits this volume."""
        if len(raw) < BITMAP_HEADER.size:
            raise BitmapError(f"{self.path}: header is {len(raw)} bytes, "
                              f"expected {BITMAP_HEADER.size}")
        magic, version, _, chunk_size, size, generation = BITMAP_HEADER.unpack(raw)
        if magic != BITMAP_MAGIC:
            raise BitmapError(f"{self.path}: bad magic {magic!r}, expected {BITMAP_MAGIC!r}")
        if version not in (BITMAP_VERSION, BITMAP_VERSION_NO_FINE, BITMAP_VERSION_NO_CRC):
            raise BitmapError(f"{self.path}: version {version}, expected {BITMAP_VERSION}")
        if chunk_size != self.chunk_size:
            raise BitmapError(f"{self.path}: chunk_size {chunk_size}, expected "
                              f"{self.chunk_size} (--chunk-size must not change; "
                              "remove the state dir to start a new generation)")
        if size != self.size:
            raise BitmapError(f"{self.path}: volume size {size}, expected {self.size} "
                              "(the disk was resized: remove the state dir)")
        # A version 1 file is as long as its bits; an upgrade cut short by a
        # crash may have made it as long as the later versions already.
        sizes = (self.crc_offset, want) if version == BITMAP_VERSION_NO_CRC else (want,)
        if have not in sizes:
            raise BitmapError(f"{self.path}: file is {have} bytes, expected {want}")
        return generation, version

    def count(self) -> int:
        """How many chunks are marked."""
        n = int.from_bytes(self.bits, "little").bit_count()
        if self.chunks % 8:     # bits past the last chunk (damage) mark nothing
            n -= (self.bits[-1] >> self.chunks % 8).bit_count()
        return n

    def block_crc(self, block: int) -> int:
        start = block * BITMAP_CRC_BLOCK
        return zlib.crc32(self.bits[start:start + BITMAP_CRC_BLOCK])

    def stored_crc(self, block: int) -> int:
        return BITMAP_CRC.unpack_from(self.map, self.crc_offset + BITMAP_CRC.size * block)[0]

    def seal(self, blocks=None) -> None:
        """Store the CRC of every block changed since (or of ``blocks``)."""
        for block in self.stale if blocks is None else blocks:
            BITMAP_CRC.pack_into(self.map, self.crc_offset + BITMAP_CRC.size * block,
                                 self.block_crc(block))
        self.stale.clear()

    def reseal(self) -> None:
        """Trust the bits as they are now: every CRC recomputed."""
        self.seal(range(self.blocks))
        self.damaged = []

    def damaged_chunks(self) -> list[tuple[int, int]]:
        """The chunk ranges [first, end) the damaged blocks cover, for the log."""
        per_block = BITMAP_CRC_BLOCK * 8
        return [(b * per_block, min((b + 1) * per_block, self.chunks)) for b in self.damaged]

    def is_set(self, chunk: int) -> bool:
        return bool(self.bits[chunk >> 3] & (1 << (chunk & 7)))

    def _changing(self, block: int) -> None:
        """The bits of ``block`` are about to change: say so in its CRC first."""
        if block not in self.stale:
            BITMAP_CRC.pack_into(self.map, self.crc_offset + BITMAP_CRC.size * block,
                                 BITMAP_CRC_CHANGING)
            self.stale.add(block)

    def set(self, chunk: int) -> None:
        byte = chunk >> 3
        self._changing(byte // BITMAP_CRC_BLOCK)
        self.bits[byte] |= 1 << (chunk & 7)

    def clear(self, chunk: int) -> None:
        byte = chunk >> 3
        self._changing(byte // BITMAP_CRC_BLOCK)
        self.bits[byte] &= ~(1 << (chunk & 7))

    def clear_all(self) -> None:
        for block in range(self.blocks):
            self._changing(block)
        self.bits[:] = bytes(len(self.bits))
        self.seal()

    def set_in(self, chunks: range):
        """Yield the chunks of ``chunks`` whose bit is set, in order (a test of
        every bit at once, so a long range of clear chunks costs little)."""
        first, stop = chunks.start, min(chunks.stop, self.chunks)
        if first >= stop:
            return
        lo = first >> 3
        value = int.from_bytes(self.bits[lo:-(-stop // 8)], "little")
        value = (value >> (first - lo * 8)) & ((1 << (stop - first)) - 1)
        while value:
            low = value & -value
            yield first + low.bit_length() - 1
            value ^= low

    def set_chunks(self):
        """Yield every chunk whose bit is set, skipping zero regions fast."""
        step = 4096
        zero = bytes(step)
        bits = self.bits
        for base in range(0, len(bits), step):
            block = bits[base:base + step]
            if block == zero[:len(block)]:
                continue
            for i, value in enumerate(block):
                if value:
                    for bit in range(8):
                        if value & (1 << bit):
                            chunk = (base + i) * 8 + bit
                            if chunk < self.chunks:
                                yield chunk

    def flush(self) -> None:
        self.map.flush()

    @property
    def closed(self) -> bool:
        return self.map.closed

    def close(self) -> None:
        self.bits.release()
        self.map.flush()
        self.map.close()


class FineSlots:
    """DirtyBitmap's second level, ``VOLUME.bitmap.fine`` (layout above): up to
    FINE_SLOTS slots, each naming one marked chunk and which of its 4 KiB
    blocks are marked.  ``mask`` gives a chunk's blocks if it has a slot
    (None: it has none, and counts whole if marked); ``put`` writes a chunk's
    marks into its slot, taking a free one for a partial mark; ``release``
    frees it.  Every change of a slot is one store: a torn one fails its CRC
    and is not trusted at open.  With 4 KiB chunks there is nothing to refine
    and no file.

    Threads::

        *                        any thread, with Stream.lock held (through DirtyBitmap)
    """

    def __init__(self, bitmap: "DirtyBitmap", path: str, trusted: bool):
        """Map the file and load its slots; make it anew (every slot free: the
        marked chunks whole) when it is not ``trusted``, missing or does not fit
        ``bitmap``."""
        self.bitmap = bitmap
        self.path = path
        self.slot_of: dict[int, int] = {}               # chunk -> its slot
        self.free = array.array("I")                    # free slots, popped from the end
        self.map = None
        self.slots = 0
        self.untrusted = 0                              # slots found not trustworthy
        if bitmap.per_chunk == 1:
            return
        self.sub_bytes = -(-bitmap.per_chunk // 8)
        self.slot_size = 1 << (FINE_SLOT.size + self.sub_bytes - 1).bit_length()
        self.slots = min(FINE_SLOTS, bitmap.chunks, FINE_TABLE_MAX // self.slot_size)
        missing = not os.path.exists(path)
        fd = private_open(path, os.O_RDWR | os.O_CREAT)
        try:
            problem = None if trusted else "the bitmap is new or was upgraded"
            if problem is None and missing:
                problem = "it is missing"
            if problem is None:
                problem = self._problem(os.pread(fd, FINE_HEADER.size, 0),
                                        os.fstat(fd).st_size)
            if problem is not None:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, FINE_TABLE_OFFSET + self.slots * self.slot_size)
                os.pwrite(fd, FINE_HEADER.pack(FINE_MAGIC, FINE_VERSION, 0, bitmap.chunk_size,
                                               bitmap.size, bitmap.generation, self.slots,
                                               self.slot_size), 0)
                os.fsync(fd)
                if trusted and bitmap.dirty_count:
                    log.info("%s: not used (%s): the %d chunks marked are resent whole",
                             path, problem, bitmap.dirty_count)
            self.map = mmap.mmap(fd, FINE_TABLE_OFFSET + self.slots * self.slot_size)
        finally:
            os.close(fd)
        self._load()

    def _problem(self, raw: bytes, have: int) -> str | None:
        """Why the file's header does not fit the bitmap, or None."""
        bm = self.bitmap
        if len(raw) < FINE_HEADER.size:
            return f"header is {len(raw)} bytes"
        magic, version, _, chunk_size, size, generation, slots, slot_size = \
            FINE_HEADER.unpack(raw)
        got = (magic, version, chunk_size, size, generation, slot_size)
        if got != (FINE_MAGIC, FINE_VERSION, bm.chunk_size, bm.size, bm.generation,
                   self.slot_size):
            return "its header does not match the bitmap"
        if not 0 < slots <= bm.chunks or have != FINE_TABLE_OFFSET + slots * slot_size:
            return f"{slots} slots in {have} bytes"
        self.slots = slots
        return None

    def offset(self, slot: int) -> int:
        return FINE_TABLE_OFFSET + slot * self.slot_size

    @staticmethod
    def crc(head: bytes, bits: bytes) -> int:
        return zlib.crc32(bits, zlib.crc32(head))

    def _load(self) -> None:
        """Trust the slots that pass their checks and name a marked chunk; free
        the rest (a stale slot names a clean chunk; an untrusted one leaves its
        chunk, if marked, whole)."""
        bm = self.bitmap
        view, size, used = self.map, self.slot_size, FINE_SLOT.size + self.sub_bytes
        claimed: dict[int, int] = {}
        twice: set[int] = set()
        bad: list[int] = []
        table_end = FINE_TABLE_OFFSET + self.slots * size
        for page in range(FINE_TABLE_OFFSET, table_end, 4096):
            if not any(view[page:min(page + 4096, table_end)]):
                continue
            for off in range(page, min(page + 4096, table_end), size):
                raw = view[off:off + used]
                if not any(raw):
                    continue
                slot = (off - FINE_TABLE_OFFSET) // size
                number, crc = FINE_SLOT.unpack_from(raw)
                chunk, mask = number - 1, int.from_bytes(raw[FINE_SLOT.size:], "little")
                if (crc != self.crc(raw[:8], raw[FINE_SLOT.size:])
                        or not 0 <= chunk < bm.chunks or not mask
                        or mask & ~bm._full(chunk) or chunk in twice):
                    bad.append(slot)
                elif chunk in claimed:                  # two slots of one chunk: neither
                    twice.add(chunk)
                    bad += [slot, claimed.pop(chunk)]
                elif bm.is_set(chunk):
                    claimed[chunk] = slot
                else:
                    self.zero(slot)                     # stale: the chunk has cleared
        for slot in bad:
            self.zero(slot)
        self.untrusted = len(bad)
        if bad:
            log.info("%s: %d of %d slots fail their checks (a crash cut an update short, "
                     "or damage): the chunks they describe are resent whole",
                     self.path, len(bad), self.slots)
        self.slot_of = claimed
        taken = set(claimed.values())
        self.free = array.array("I", (s for s in range(self.slots - 1, -1, -1)
                                      if s not in taken))

    def slot_mask(self, slot: int) -> int:
        off = self.offset(slot) + FINE_SLOT.size
        return int.from_bytes(self.map[off:off + self.sub_bytes], "little")

    def mask(self, chunk: int) -> int | None:
        """The blocks ``chunk``'s slot marks, or None: it has no slot."""
        slot = self.slot_of.get(chunk)
        return None if slot is None else self.slot_mask(slot)

    def zero(self, slot: int) -> None:
        off = self.offset(slot)
        self.map[off:off + FINE_SLOT.size + self.sub_bytes] = bytes(FINE_SLOT.size + self.sub_bytes)

    def write(self, slot: int, chunk: int, mask: int) -> None:
        """The slot says ``mask`` for ``chunk``, in one store (a torn one fails its CRC)."""
        head = (chunk + 1).to_bytes(8, "big")
        bits = mask.to_bytes(self.sub_bytes, "little")
        off = self.offset(slot)
        self.map[off:off + FINE_SLOT.size + self.sub_bytes] = \
            FINE_SLOT.pack(chunk + 1, self.crc(head, bits)) + bits

    def put(self, chunk: int, mask: int, whole: bool) -> None:
        """``chunk`` is marked in the blocks ``mask`` (``whole``: all of them):
        its slot says so, one taken from the free ones unless the mark is
        whole, which needs none.  Without a free slot the chunk counts whole."""
        slot = self.slot_of.get(chunk)
        if slot is None and self.free and not whole:
            slot = self.slot_of[chunk] = self.free.pop()
        if slot is not None:
            self.write(slot, chunk, mask)

    def release(self, chunk: int) -> None:
        """``chunk`` is clean (its bit already cleared): free its slot."""
        slot = self.slot_of.pop(chunk, None)
        if slot is not None:
            self.zero(slot)
            self.free.append(slot)

    def clear(self) -> None:
        """Every slot free (the bits are clear already)."""
        if self.map is not None:
            self.map[FINE_TABLE_OFFSET:] = bytes(len(self.map) - FINE_TABLE_OFFSET)
        self.free = array.array("I", range(self.slots - 1, -1, -1))
        self.slot_of.clear()

    def flush(self) -> None:
        if self.map is not None:
            self.map.flush()

    def close(self) -> None:
        if self.map is not None:
            self.map.flush()
            self.map.close()


class DirtyBitmap:
    """What was written and is not yet safe at the hub, per 4 KiB block, in two
    memory-mapped files, plus the in-memory rule state per block.

    Two levels: ``VOLUME.bitmap`` (``ChunkBits``) holds one bit per chunk;
    ``VOLUME.bitmap.fine`` (``FineSlots``) up to FINE_SLOTS slots, each naming
    one marked chunk and which of its 4 KiB blocks are marked.  A chunk whose
    bit is set is dirty in the blocks its slot names, or whole when it has
    no slot (none was free, the write covered it whole, or the slot could
    not be trusted).  Why two levels and slots, and what they take per TiB
    (3 MiB of files at 64 KiB chunks, whatever the writes): docs/DESIGN.md
    "The state directory".

    The rules run per block (docs/SEMANTICS.md "Agent's dirty bitmap"): a block
    clears when no queued write covering it is un-ACKed and every loss of a
    write covering it was followed by a SYNCED reply covering it whole; a
    chunk's bit clears when none of its blocks is marked.  In memory, per
    chunk touched in this run (``_Marks``): the marked blocks, the masks of
    its writes in flight, and per stream position the blocks lost there.  A
    chunk loaded marked and not touched since has no entry: it is lost at
    LOADED_SEQ in the blocks the files give it.

    Crash safety (an agent SIGKILLed at any point loses no block written
    before it): whatever the files hold covers every marked block.  A chunk
    that becomes dirty gets its slot written before its bit; a chunk that
    clears loses its bit before its slot (a slot of a clean chunk is stale
    and freed at open); a slot is only rewritten with the chunk's marks as
    they are now, in one store.  A slot that cannot be trusted costs its
    chunk's precision (resent whole), never a mark; the second level is never
    trusted beside a first level that is new, upgraded or of another
    generation, or when it is missing or cut short (a line says so).  First
    level damage makes the hub verify the volume (``ChunkBits``).

    The rule methods take a ``Span`` of blocks, or a ``range`` of chunks
    meaning those chunks whole (a fail-back's PUT, a fail-back that marks
    everything).  Not locked itself: every method runs with ``Stream.lock``
    held (any thread), which is also what makes "mark, then queue" atomic.

    Threads::

        reseal                   main, at start (Volume.open_bitmap)
        close                    main, at stop
        *                        any thread, with Stream.lock held
    """

    def __init__(self, path: str, size: int, chunk_size: int, fsync: bool = False):
        self.path = path
        self.size = size
        self.chunk_size = chunk_size
        self.chunks = -(-size // chunk_size)
        self.per_chunk = chunk_size // FINE_BLOCK     # blocks per chunk
        self.total_blocks = -(-size // FINE_BLOCK)
        self.fsync = fsync
        self.states: dict[int, _Marks] = {}
        self.dirty_blocks = 0           # blocks marked
        self.lossy = 0                  # entries of ``states`` with a loss
        self.chunk_bits = bits = ChunkBits(path, size, chunk_size)
        self.generation, self.created = bits.generation, bits.created
        self.dirty_count = bits.count()  # chunks whose bit is set
        self.loaded = self.dirty_count   # chunks marked at open and not touched since
        # The second level before the header that says it is kept: a crash
        # in between finds a version 1 or 2 bitmap, upgraded again.
        self.fine = FineSlots(self, path + ".fine", trusted=not bits.created and not bits.upgraded)
        self.dirty_blocks = self._count_blocks()
        bits.commit()
        if bits.upgraded:
            log.info("%s: upgraded from bitmap version %d to %d: %s4 KiB blocks are tracked in "
                     "%s from now on; the %d chunks marked so far are resent whole", path,
                     bits.upgraded, BITMAP_VERSION, "block CRCs added; "
                     if bits.upgraded == BITMAP_VERSION_NO_CRC else "", self.fine.path,
                     self.dirty_count)

    @property
    def damaged(self) -> list[int]:
        """The CRC blocks of the first level that failed at open (see ChunkBits)."""
        return self.chunk_bits.damaged

    def _count_blocks(self) -> int:
        """The blocks the files mark (at open)."""
        slot_of = self.fine.slot_of
        n = (self.dirty_count - len(slot_of)) * self.per_chunk + sum(
            self.fine.slot_mask(s).bit_count() for s in slot_of.values())
        last = self.chunks - 1
        if self.is_set(last) and last not in slot_of:
            n -= self.per_chunk - self._full(last).bit_length()
        return n

    def _full(self, chunk: int) -> int:
        """The mask of every block of ``chunk`` (the last chunk may have fewer)."""
        if chunk < self.chunks - 1:
            return (1 << self.per_chunk) - 1
        return (1 << (self.total_blocks - chunk * self.per_chunk)) - 1

    def _persisted(self, chunk: int) -> int:
        """The blocks the files give a marked chunk: its slot's, or all."""
        mask = self.fine.mask(chunk)
        return self._full(chunk) if mask is None else mask

    # -- the first level ---------------------------------------------------

    def reseal(self) -> None:
        """Trust the bits as they are now: recompute every CRC (the caller has
        made sure the volume is verified anyway)."""
        self.chunk_bits.reseal()
        self.sync()

    def damaged_chunks(self) -> list[tuple[int, int]]:
        """The chunk ranges [first, end) the damaged blocks cover, for the log."""
        return self.chunk_bits.damaged_chunks()

    def is_set(self, chunk: int) -> bool:
        return self.chunk_bits.is_set(chunk)

    def _set_bit(self, chunk: int) -> None:
        self.chunk_bits.set(chunk)
        self.dirty_count += 1

    def _clear_bit(self, chunk: int) -> None:
        self.chunk_bits.clear(chunk)
        self.dirty_count -= 1

    def _set_marked(self, chunk: int, st: _Marks, new: int) -> None:
        """Mark exactly the blocks ``new`` of ``chunk``, in memory and in the files,
        in an order after which a crash at any point leaves the files saying at
        least what is marked before and after."""
        old = st.marked
        if new == old:
            return
        st.marked = new
        self.dirty_blocks += new.bit_count() - old.bit_count()
        if not new:
            self._clear_bit(chunk)              # first: a slot left over is stale
            self.fine.release(chunk)
            return
        self.fine.put(chunk, new, whole=new == self._full(chunk))  # before the bit
        if not old:
            self._set_bit(chunk)

    # -- the rules, per block ----------------------------------------------------

    def chunk_range(self, offset: int, length: int) -> range:
        """The chunks a write of ``length`` bytes at ``offset`` touches."""
        return range(offset // self.chunk_size, (offset + length - 1) // self.chunk_size + 1)

    def block_span(self, offset: int, length: int) -> Span:
        """The 4 KiB blocks a write of ``length`` bytes at ``offset`` touches."""
        return Span(offset // FINE_BLOCK, -(-(offset + length) // FINE_BLOCK))

    def covered_span(self, offset: int, length: int) -> Span:
        """The blocks a read of that range covers whole (the last block may end at
        the volume's end): a partial read says nothing of the rest of a block."""
        end = offset + length
        last = self.total_blocks if end >= self.size else end // FINE_BLOCK
        first = -(-offset // FINE_BLOCK)
        return Span(first, max(first, last))

    def chunks_of(self, where) -> range:
        """The chunks a span (or a range of chunks) touches."""
        if isinstance(where, range):
            return where
        first, end = where
        return range(first // self.per_chunk, -(-end // self.per_chunk))

    def _masks(self, where):
        """Yield (chunk, mask of its blocks) over a Span, or a range of chunks whole."""
        if isinstance(where, range):
            first = where.start * self.per_chunk
            end = min(where.stop * self.per_chunk, self.total_blocks)
        else:
            first, end = where
        per = self.per_chunk
        while first < end:
            chunk, lo = divmod(first, per)
            n = min(end - first, per - lo)
            yield chunk, ((1 << n) - 1) << lo
            first += n

    def _mask_in(self, where, chunk: int) -> int:
        """The mask of ``chunk``'s blocks inside a Span (or a range of chunks whole)."""
        if isinstance(where, range):
            return self._full(chunk)
        base = chunk * self.per_chunk
        lo, hi = max(where[0], base) - base, min(where[1], base + self.per_chunk) - base
        return ((1 << (hi - lo)) - 1) << lo

    def _states_in(self, where):
        """Yield (chunk, mask, entry) over a Span or a range of chunks, for the
        chunks that have an entry (``_state(create=False)``).  A span longer
        than the entries held is not walked chunk by chunk: a SYNCED for a
        zero extent can cover a whole disk."""
        if not isinstance(where, range) and where[0] >= where[1]:
            return                  # an empty span (chunks_of still names its chunk)
        chunks = self.chunks_of(where)
        if len(chunks) <= len(self.states):
            for chunk, mask in self._masks(where):
                st = self._state(chunk, create=False)
                if st is not None:
                    yield chunk, mask, st
            return
        found = {c for c in self.states if c in chunks}
        found.update(self.chunk_bits.set_in(chunks))
        for chunk in sorted(found):
            yield chunk, self._mask_in(where, chunk), self._state(chunk, create=False)

    def _state(self, chunk: int, create: bool) -> _Marks | None:
        """The chunk's entry: made for a chunk loaded marked (lost at LOADED_SEQ in
        the blocks the files give it), or a new one if ``create``."""
        st = self.states.get(chunk)
        if st is None and self.is_set(chunk):
            mask = self._persisted(chunk)
            st = self.states[chunk] = _Marks(mask, LOADED_SEQ, mask)
            self.loaded -= 1
            self.lossy += 1
        elif st is None and create:
            st = self.states[chunk] = _Marks()
        return st

    def _lose(self, st: _Marks, mask: int, seq: int) -> None:
        """The blocks ``mask`` were lost at ``seq``."""
        self.lossy += not st.has_loss()
        st.lose(mask, seq)

    def _unflight(self, st: _Marks, mask: int) -> None:
        """One queued write over exactly ``mask`` is no longer in flight."""
        n = st.flight.get(mask, 0) if st.flight else 0
        if n > 1:
            st.flight[mask] = n - 1
        elif n == 1:
            del st.flight[mask]
            if not st.flight:
                st.flight = None

    def _settle(self, chunk: int, st: _Marks, mask: int) -> None:
        """Clear the blocks of ``mask`` that nothing holds any more."""
        done = mask & st.marked & ~st.busy()
        if done:
            self._set_marked(chunk, st, st.marked & ~done)
        if not st.marked and st.flight is None and not st.has_loss():
            del self.states[chunk]

    def mark(self, where) -> None:
        """A write from QEMU touches these blocks: mark them before QEMU is answered."""
        for chunk, mask in self._masks(where):
            st = self._state(chunk, create=True)
            self._set_marked(chunk, st, st.marked | mask)
        self.chunk_bits.seal()
        if self.fsync:
            self.sync()

    def add_inflight(self, where) -> None:
        """A WRITE/ZERO over these blocks was queued for the hub."""
        for chunk, mask in self._masks(where):
            st = self._state(chunk, create=True)
            if st.flight is None:
                st.flight = {}
            st.flight[mask] = st.flight.get(mask, 0) + 1

    def ack(self, where) -> None:
        """The hub ACKed one queued write over these blocks: clear what is done."""
        for chunk, mask, st in self._states_in(where):
            self._unflight(st, mask)
            self._settle(chunk, st, mask)
        self.chunk_bits.seal()

    def lose(self, where, seq: int) -> None:
        """A write over these blocks was dropped (not sent) at stream seq."""
        for chunk, mask in self._masks(where):
            self._lose(self._state(chunk, create=True), mask, seq)

    def drop_inflight(self, where, seq: int) -> None:
        """A queued write will never be ACKed (connection lost): it is dropped."""
        for chunk, mask in self._masks(where):
            st = self._state(chunk, create=True)
            self._unflight(st, mask)
            self._lose(st, mask, seq)

    def synced(self, where, seq: int) -> None:
        """SYNCED for a reply queued at ``seq`` covering these blocks whole: forget
        their older losses, clear what is done."""
        for chunk, mask, st in self._states_in(where):
            if st.has_loss():
                st.forgive(mask, seq)
                self.lossy -= not st.has_loss()
            self._settle(chunk, st, mask)
        self.chunk_bits.seal()

    def sync(self) -> None:
        """msync both levels: they survive a host crash, not only an agent crash."""
        self.fine.flush()
        self.chunk_bits.flush()

    def clear_all(self) -> None:
        """Forget every mark: the volume is known to equal the hub's (fail-back
        DONE).  Nothing may be in flight for the volume."""
        self.chunk_bits.clear_all()
        self.fine.clear()                  # after the bits: a slot left is stale
        self.states.clear()
        self.dirty_count = self.dirty_blocks = self.loaded = self.lossy = 0
        self.sync()

    # -- reading it out --------------------------------------------------------

    @property
    def inflight(self) -> dict[int, int]:
        """Per chunk, the queued writes touching it not ACKed yet (a view)."""
        return {c: sum(st.flight.values()) for c, st in self.states.items() if st.flight}

    @property
    def lost_seq(self) -> dict[int, int]:
        """Per chunk with a loss, the stream position of its latest (a view;
        LOADED_SEQ for a mark loaded from the files)."""
        out = {c: st.latest_loss() for c, st in self.states.items() if st.has_loss()}
        if self.loaded:
            out.update((c, LOADED_SEQ) for c in self.set_chunks() if c not in self.states)
        return out

    @property
    def has_losses(self) -> bool:
        """Some block waits for a SYNCED (a resync), not only for ACKs."""
        return bool(self.lossy or self.loaded)

    @property
    def lost_chunks(self) -> int:
        return self.lossy + self.loaded

    @property
    def inflight_chunks(self) -> int:
        return sum(1 for st in self.states.values() if st.flight)

    def marked_blocks(self, chunk: int) -> int:
        """The mask of the blocks of ``chunk`` that are marked."""
        st = self.states.get(chunk)
        if st is not None:
            return st.marked
        return self._persisted(chunk) if self.is_set(chunk) else 0

    def set_chunks(self):
        """Yield every chunk whose bit is set."""
        return self.chunk_bits.set_chunks()

    def extents(self, chunks=None, limit: int = MAX_EXTENTS) -> list[tuple[int, int]]:
        """Sorted, merged (offset, length) byte extents of the marked blocks of the
        given (or every marked) chunk: 4 KiB aligned, the last one may stop at
        the volume's end.

        At most ``limit`` extents: beyond it, neighbours separated by the
        smallest gaps are joined (a superset of the dirty regions is allowed).
        """
        out: list[list[int]] = []
        for chunk in sorted(chunks) if chunks is not None else self.set_chunks():
            base = chunk * self.chunk_size
            for lo, hi in _runs(self.marked_blocks(chunk)):
                start = base + lo * FINE_BLOCK
                end = min(base + hi * FINE_BLOCK, self.size)
                if out and out[-1][1] == start:
                    out[-1][1] = end
                else:
                    out.append([start, end])
        gap = FINE_BLOCK
        while len(out) > limit:
            joined = [out[0]]
            for start, end in out[1:]:
                if start - joined[-1][1] <= gap:
                    joined[-1][1] = end
                else:
                    joined.append([start, end])
            out, gap = joined, gap * 2
        return [(s, e - s) for s, e in out]

    @property
    def dirty_bytes(self) -> int:
        """Bytes of the chunks marked."""
        return self.dirty_count * self.chunk_size

    @property
    def dirty_block_bytes(self) -> int:
        """Bytes of the 4 KiB blocks marked: what a resync of them fetches."""
        n = self.dirty_blocks * FINE_BLOCK
        tail = self.size % FINE_BLOCK
        if tail:                # the last block is shorter
            chunk, block = divmod(self.total_blocks - 1, self.per_chunk)
            if self.marked_blocks(chunk) >> block & 1:
                n -= FINE_BLOCK - tail
        return n

    def close(self) -> None:
        """Unmap both levels (again: nothing)."""
        if self.chunk_bits.closed:
            return
        self.chunk_bits.close()
        self.fine.close()


# ---------------------------------------------------------------------------
# QMP client (qemu/qemu docs/interop/qmp-spec)


class QMPError(Exception):
    """QEMU answered a command with an error: keeps the class and description."""

    def __init__(self, command: str, error_class: str, desc: str):
        self.command, self.error_class, self.desc = command, error_class, desc
        super().__init__(f"QMP {command} failed: {error_class}: {desc}")


class QMPClosed(ConnectionError):
    """The QMP socket closed (QSD exited or restarted)."""


#: A QSD that has been running a while may have this many stale events queued.
MAX_EVENTS_BEFORE_GREETING = 1000


class QMPClient:
    """A small blocking QMP client over a unix socket.

    ``execute`` runs in any thread and waits for the reply with the same id;
    the ``qmp-reader`` thread reads every line, hands replies to their
    waiter and events to ``on_event`` (called in the reader thread).

    Threads::

        execute              any thread; the reply comes back on qmp-reader
        close                main, or repagent-jobs when QSD went away
    """

    def __init__(self, path: str, on_event: Callable[[dict], None] | None = None,
                 timeout: float = QMP_TIMEOUT):
        self.path = path
        self.timeout = timeout
        self.on_event = on_event
        self._ids = iter(range(1, 1 << 62))
        self._lock = threading.Lock()
        self._waiters: dict[str, list] = {}
        self.closed = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(path)
            except OSError as err:      # name the socket: errno alone does not
                raise QMPClosed(f"cannot connect to QMP socket {path}: "
                                f"{err.strerror or err}") from err
            self._file = self.sock.makefile("rb")
            greeting = self._read_json()
            # QSD 7.2 can hand a new client events that were pending for a
            # previous client (seen after the agent was SIGKILLed mid-job)
            # before its greeting.  The agent queries the jobs' state once
            # connected, so such stale events are logged and skipped.
            for _ in range(MAX_EVENTS_BEFORE_GREETING):
                if "event" not in greeting:
                    break
                log.info("QMP %s: skipping %s sent before the greeting", path,
                         greeting["event"])
                greeting = self._read_json()
            if "QMP" not in greeting:
                raise QMPClosed(f"QMP greeting expected from {path}, got {greeting!r}")
            self.sock.settimeout(None)
        except BaseException:
            self.sock.close()
            raise
        self.version = greeting["QMP"].get("version", {}).get("qemu", {})
        self._reader = threading.Thread(target=self._read_loop, name="qmp-reader", daemon=True)
        self._reader.start()
        self.execute("qmp_capabilities")

    def _read_json(self) -> dict:
        line = self._file.readline()
        if not line:
            raise QMPClosed(f"QMP socket {self.path} closed")
        return json.loads(line)

    def _read_loop(self) -> None:
        """qmp-reader thread."""
        try:
            while True:
                msg = self._read_json()
                if "event" in msg:
                    log.debug("QMP event %s %s", msg["event"], msg.get("data"))
                    if self.on_event:
                        try:
                            self.on_event(msg)
                        except Exception:  # an event handler bug must not kill QMP
                            log.exception("QMP event handler failed on %s", msg["event"])
                    continue
                with self._lock:
                    waiter = self._waiters.pop(str(msg.get("id")), None)
                if waiter is not None:
                    waiter[1] = msg
                    waiter[0].set()
        except (OSError, ValueError, QMPClosed) as err:
            log.debug("QMP reader stops: %s", err)
        finally:
            self.closed.set()
            with self._lock:
                waiters, self._waiters = self._waiters, {}
            for event, _ in waiters.values():
                event.set()

    def execute(self, command: str, **arguments):
        """Run one command; return its "return" value or raise QMPError/QMPClosed."""
        if self.closed.is_set():
            raise QMPClosed(f"QMP socket {self.path} is closed")
        ident = str(next(self._ids))
        waiter = [threading.Event(), None]
        with self._lock:
            self._waiters[ident] = waiter
        request = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = arguments
        log.debug("QMP --> %s %s", command, arguments or "")
        try:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as err:
            raise QMPClosed(f"QMP send failed: {err}") from err
        if not waiter[0].wait(self.timeout):
            with self._lock:
                self._waiters.pop(ident, None)
            raise TimeoutError(f"QMP {command}: no answer within {self.timeout}s")
        reply = waiter[1]
        if reply is None:
            raise QMPClosed(f"QMP socket closed while waiting for {command}")
        if "error" in reply:
            raise QMPError(command, reply["error"].get("class", "?"),
                           reply["error"].get("desc", ""))
        return reply.get("return")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(2.0)


# ---------------------------------------------------------------------------
# The mirror job (docs/QEMU.md "How a copy of every guest write leaves QEMU")


class JobSetup(enum.Enum):
    STARTED = "started"        # no job before: a new mirror
    RESUMED = "resumed"        # our job from an earlier run of the agent
    RESTARTED = "restarted"    # the state dir had a job, QSD did not: QSD restarted


def qemu_names(node: str) -> tuple[str, str, str]:
    """(job id, target node, filter node) for a source node.

    QEMU node names hold at most 31 characters; long names are hashed.
    """
    base = f"ra-{node}"
    if len(base) > 27:
        base = "ra-" + hashlib.sha256(node.encode()).hexdigest()[:12]
    return base, f"{base}-tgt", f"{base}-top"


def find_node(qmp: QMPClient, node: str) -> dict:
    for info in qmp.execute("query-named-block-nodes", flat=True):
        if info.get("node-name") == node:
            return info
    raise LookupError(f"QSD has no block node named {node!r} "
                      "(see query-named-block-nodes)")


def find_job(qmp: QMPClient, job_id: str) -> dict | None:
    for job in qmp.execute("query-block-jobs"):
        if job.get("device") == job_id:
            return job
    return None


def job_is_paused(job: dict) -> bool:
    return bool(job.get("paused")) or job.get("status") in ("paused", "standby")


def setup_mirror(qmp: QMPClient, meta: dict, target_socket: str, export: str,
                 chunk_size: int, reconnect_delay: int) -> JobSetup:
    """Start the active mirror of meta["node"] into our NBD target, or resume ours."""
    job_id, target, filter_node = meta["job_id"], meta["target_node"], meta["filter_node"]
    job = find_job(qmp, job_id)
    if job is not None and job.get("status") in ("concluded", "null", "aborting"):
        log.warning("mirror job %s is %s (error %r): dismissing it and starting again",
                    job_id, job.get("status"), job.get("error"))
        try:
            qmp.execute("job-dismiss", id=job_id)
        except QMPError as err:
            log.warning("job-dismiss %s: %s", job_id, err)
        job = None
    if job is not None:
        if job_is_paused(job):
            qmp.execute("block-job-resume", device=job_id)
            log.info("mirror job %s was paused (io-status %s): resumed", job_id,
                     job.get("io-status"))
        log.info("mirror job %s of node %s resumed (status %s), not restarted",
                 job_id, meta["node"], job.get("status"))
        return JobSetup.RESUMED
    outcome = JobSetup.RESTARTED if meta.get("mirror") else JobSetup.STARTED
    nodes = {n.get("node-name") for n in qmp.execute("query-named-block-nodes", flat=True)}
    if target in nodes:
        qmp.execute("blockdev-del", **{"node-name": target})
    qmp.execute("blockdev-add", driver="nbd", **{"node-name": target},
                server={"type": "unix", "path": target_socket}, export=export,
                **{"reconnect-delay": reconnect_delay})
    qmp.execute("blockdev-mirror", **{
        "job-id": job_id, "device": meta["node"], "target": target, "sync": "none",
        "copy-mode": "write-blocking", "on-target-error": "stop",
        "on-source-error": "stop", "auto-finalize": False, "auto-dismiss": False,
        "filter-node-name": filter_node, "granularity": chunk_size})
    log.info("mirror job %s of node %s %s (write-blocking into %s)", job_id, meta["node"],
             outcome.value, target_socket)
    return outcome


def teardown_mirror(qmp: QMPClient, meta: dict, timeout: float = 30.0) -> None:
    """cancel -> finalize -> dismiss -> blockdev-del (never block-job-complete:
    that would pivot the guest onto our target)."""
    job_id, target = meta["job_id"], meta["target_node"]
    deadline = time.monotonic() + timeout
    job = find_job(qmp, job_id)
    if job is not None:
        if job.get("status") not in ("pending", "concluded", "aborting"):
            qmp.execute("block-job-cancel", device=job_id, force=True)
        while job is not None and time.monotonic() < deadline:
            status = job.get("status")
            if status == "pending":
                qmp.execute("job-finalize", id=job_id)
            elif status == "concluded":
                qmp.execute("job-dismiss", id=job_id)
            time.sleep(0.05)  # QEMU offers no blocking wait on a job state over QMP
            job = find_job(qmp, job_id)
        if job is not None:
            raise TimeoutError(f"mirror job {job_id} still {job.get('status')} after "
                               f"{timeout}s")
        log.info("mirror job %s cancelled and dismissed", job_id)
    nodes = {n.get("node-name") for n in qmp.execute("query-named-block-nodes", flat=True)}
    if target in nodes:
        qmp.execute("blockdev-del", **{"node-name": target})
        log.info("target node %s deleted", target)


def failback_export(volume: str) -> str:
    """The id and name of the agent's own writable export during a fail-back."""
    return f"repagent-fb-{volume}"


def node_writers(qmp: QMPClient, node: str, through_filters: bool = True) -> int:
    """How many users of QSD can write ``node``: block-backends (exports, a
    VM's drive) and block-jobs holding the "write" permission on it, or (with
    ``through_filters``) on a filter node above it that holds "write" on it
    (the mirror's filter).  Without: the writers that bypass such a filter.

    Read from ``x-debug-query-block-graph`` (see the module docstring for
    what QSD 7.2 shows); anonymous block-backends cannot be named, so this
    counts them.  The mirror job itself holds no "write" on the node.
    """
    graph = qmp.execute("x-debug-query-block-graph")
    kinds = {n["id"]: (n.get("type"), n.get("name")) for n in graph.get("nodes", [])}
    ids = {i for i, (kind, name) in kinds.items() if kind == "block-driver" and name == node}
    writing = [e for e in graph.get("edges", []) if "write" in e.get("perm", [])]
    chain, todo = set(ids), list(ids) if through_filters else []
    while todo:                          # up through filters that write the node
        child = todo.pop()
        for e in writing:
            parent = e["parent"]
            if e["child"] == child and kinds.get(parent, ("",))[0] == "block-driver" \
                    and parent not in chain:
                chain.add(parent)
                todo.append(parent)
    return sum(1 for e in writing if e["child"] in chain
               and kinds.get(e["parent"], ("",))[0] in ("block-backend", "block-job"))


def exports_on(qmp: QMPClient, node: str, filter_node: str) -> list[str]:
    """Ids of the block exports on ``node`` or on its mirror filter."""
    return [e.get("id", "?") for e in qmp.execute("query-block-exports")
            if e.get("node-name") in (node, filter_node)]


def delete_export(qmp: QMPClient, export: str, timeout: float = 10.0) -> bool:
    """block-export-del in mode "hard" (our own client may still be on its way
    out; "safe" refuses an export "still in use").  False if there was none."""
    def listed():
        return any(e.get("id") == export for e in qmp.execute("query-block-exports"))
    if not listed():
        return False
    qmp.execute("block-export-del", id=export, mode="hard")
    deadline = time.monotonic() + timeout
    while listed():                 # "shutting-down" until its connections are gone
        if time.monotonic() > deadline:
            raise TimeoutError(f"export {export} still listed {timeout}s after "
                               "block-export-del")
        time.sleep(0.02)            # QMP offers no blocking wait on an export's end
    return True


# ---------------------------------------------------------------------------
# Reading the protected volume for the hub


class FileSource:
    """Reads a raw image file directly (QSD shares the page cache).

    Threads::

        *                    repagent-sync-N, repagent-failback or nbd-conn-VOLUME-N
                             (each reader has one user)
    """

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # a sparse raw file shorter than the node reads as zeroes
            data += bytes(length - len(data))
        return data

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, reads_as_zero) runs from ``offset``: the file's holes
        (SEEK_HOLE) and what lies past its end read as zeroes."""
        out, pos, end = [], offset, offset + length
        while pos < end:
            try:
                data = min(os.lseek(self.fd, pos, os.SEEK_DATA), end)
            except OSError as err:
                if err.errno != errno.ENXIO:   # ENXIO: no data at or after pos
                    raise
                data = end
            if data > pos:
                out.append((data - pos, True))
            if data < end:
                hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
                out.append((hole - data, False))
                data = hole
            pos = data
        return out

    def close(self) -> None:
        os.close(self.fd)

    def __repr__(self):
        return f"file:{self.path}"


class NBDSource:
    """Reads QSD's NBD export of the node; reconnects once on a broken connection.

    Threads::

        *                    repagent-sync-N, repagent-failback or nbd-conn-VOLUME-N
                             (each reader has one user)
    """

    def __init__(self, address, export: str):
        self.address, self.export = address, export
        self.client: nbd.NBDClient | None = None

    def read(self, offset: int, length: int) -> bytes:
        return self._call(lambda c: c.read(offset, length), "reading")

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, reads_as_zero) runs from ``offset`` from NBD block status
        (``base:allocation``: NBD_STATE_ZERO means zeroes; a hole without it
        says nothing).  They may cover only a prefix of the range.  Without
        block status at the server, the whole range is data."""
        def status(client):
            if not client.can_block_status:
                return [(length, False)]
            return [(n, bool(flags & nbd.BlockState.ZERO))
                    for n, flags in client.block_status(offset, length)]
        return self._call(status, "block status of")

    def _call(self, request, what: str):
        """Run ``request(client)``, reconnecting once on a broken connection."""
        for attempt in (1, 2):
            try:
                if self.client is None:
                    self.client = nbd.NBDClient(self.address, self.export, timeout=60.0,
                                                block_status=True)
                return request(self.client)
            except (OSError, nbd.ProtocolError) as err:
                self.close()
                if attempt == 2:
                    raise OSError(errno.EIO, f"{what} {self!r}: {err}") from err
            except nbd.RequestError as err:
                raise OSError(err.error, f"{what} {self!r}: {err}") from err
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except OSError:
                pass
            self.client = None

    def __repr__(self):
        return f"nbd:{self.address}/{self.export}"


def parse_nbd_uri(uri: str):
    """'nbd+unix:///EXPORT?socket=PATH' or 'nbd://HOST[:PORT]/EXPORT' -> (address, export)."""
    parts = urllib.parse.urlsplit(uri)
    export = urllib.parse.unquote(parts.path.lstrip("/"))
    if parts.scheme == "nbd+unix":
        sock = urllib.parse.parse_qs(parts.query).get("socket")
        if not sock:
            raise ValueError(f"NBD URI {uri!r} has no ?socket=PATH")
        return sock[0], export
    if parts.scheme == "nbd":
        if not parts.hostname:
            raise ValueError(f"NBD URI {uri!r} has no host")
        return (parts.hostname, parts.port or 10809), export
    raise ValueError(f"NBD URI {uri!r}: scheme {parts.scheme!r}, expected nbd+unix or nbd")


def raw_image_file(node_info: dict) -> str | None:
    """The image file of a raw-format node over a plain file, else None."""
    if node_info.get("drv") != "raw":
        return None
    image = node_info.get("image", {})
    filename = image.get("filename", "")
    if filename and os.path.isfile(filename) and not filename.startswith("json:"):
        return filename
    return None


# ---------------------------------------------------------------------------
# Volumes and the NBD target


@dataclasses.dataclass
class PendingWrite:
    """A WRITE/ZERO queued for the hub and not ACKed yet."""

    request_id: int
    volume: "Volume"
    span: Span                            # the 4 KiB blocks it writes
    length: int
    reply: Callable[[int], None] | None   # sync mode: QEMU waits for the ACK
    deadline: float = 0.0


@dataclasses.dataclass
class Failback:
    """A fail-back in progress on one volume (PROTOCOL.md "Fail-back").

    Created by FAILBACK_BEGIN before the mirror is torn down (so the jobs
    thread leaves the volume alone), ``client`` set once the BEGIN is ACKed;
    only the repagent-failback thread changes it."""

    conn: "HubConnection"
    export: str
    client: nbd.NBDClient | None = None
    puts: int = 0
    put_bytes: int = 0
    started: float = dataclasses.field(default_factory=time.time)


@dataclasses.dataclass
class ReadWindow:
    """A hub READ/CHECKSUM_QUERY/EXTENT_QUERY being served: overlapping writes are
    held until its answer is queued (``SyncServer.read_window``).

    Threads::

        answer               repagent-sync-N, with Stream.lock taken here
    """

    start: int
    end: int
    conn: "HubConnection"
    reply: p.Message | None = None     # the answer, queued as the window closes
    nbytes: int = 0                    # of it, data counted in the send queue

    def answer(self, reply: p.Message, nbytes: int = 0) -> None:
        self.reply, self.nbytes = reply, nbytes


META_FORMAT = 1
"""Version of VOLUME.json (its "format" key; files without one are format 1)."""

MAX_META_SIZE = 64 * 1024
"""VOLUME.json holds a few names and flags: anything longer is not ours."""

META_FIELDS = {"format": int, "volume": str, "node": str, "job_id": str,
               "target_node": str, "filter_node": str, "mirror": bool,
               "needs_verify": bool}
"""The keys of VOLUME.json and their JSON types (other keys are kept as they are)."""


def parse_meta(raw: bytes) -> tuple[dict, str | None]:
    """(VOLUME.json's content, None), or ({}, what is wrong with it)."""
    if len(raw) > MAX_META_SIZE:
        return {}, f"longer than {MAX_META_SIZE} bytes"
    try:
        saved = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return {}, f"not UTF-8 text: {err.reason} at byte {err.start}"
    except json.JSONDecodeError as err:
        return {}, (f"not JSON: {err.msg} at line {err.lineno} column {err.colno}"
                    if raw.strip(b"\0 \t\r\n") else "empty or zeroed")
    if not isinstance(saved, dict):
        return {}, f"a JSON {type(saved).__name__}, expected an object"
    for key, kind in META_FIELDS.items():
        value = saved.get(key)
        # bool is an int to Python, not to JSON: 'format: true' is wrong.
        if key in saved and (not isinstance(value, kind)
                             or (kind is int and isinstance(value, bool))):
            return {}, f"{key!r} is {value!r}, expected a JSON {kind.__name__}"
    if "node" not in saved:
        return {}, "no 'node'"
    return saved, None


class Volume:
    """One protected node: its bitmap, QEMU names, hub id and counters.

    Threads::

        open_bitmap          main, at start
        read_once            any thread (a reader of its own)
        save_meta            any thread; under Stream.lock where the stream decides what it saves
        attach_state, must_hold  any thread, with Stream.lock held
        phase                any thread, with Stream.lock held
    """

    def __init__(self, name: str, node: str, state_dir: str):
        self.name = p.validate_name(name, "volume name")
        self.node = node
        self.state_dir = state_dir
        self.meta_path = os.path.join(state_dir, f"{name}.json")
        self.bitmap_path = os.path.join(state_dir, f"{name}.bitmap")
        self.target_socket = check_unix_path(os.path.join(state_dir, f"{name}.nbd"),
                                              "NBD target socket")
        self.meta_missing = False       # no VOLUME.json (set by _load_meta)
        self.meta = self._load_meta()
        self.size = 0
        self.bitmap: DirtyBitmap | None = None
        self.source = None              # factory for a reader (one per sync thread)
        self.server: nbd.NBDServer | None = None
        self.volume_id: int | None = None   # the hub's id on the current connection
        self.refused: str | None = None     # why the hub refused the last ATTACH
        self.plan: p.SyncPlan | None = None
        self.windows: list[ReadWindow] = []
        self.held: collections.deque = collections.deque()  # (msg, PendingWrite)
        self.dropped: set[int] = set()  # chunks dropped while attached, not yet reported
        self.drop_report: p.DirtyMap | None = None  # queued to report them, not yet sent
        self.queued_frames = 0
        self.queued_bytes = 0
        self.job_status = "unknown"
        self.job_info: dict = {}        # the last query-block-jobs entry
        self.failback: Failback | None = None
        self.bypass_writers = 0         # writers of the node that skip the mirror
        self.counters = collections.Counter()

    def read_once(self, offset: int, length: int) -> bytes:
        """Read the protected volume with a reader of its own (any thread)."""
        reader = self.source()
        try:
            return reader.read(offset, length)
        finally:
            reader.close()

    def _load_meta(self) -> dict:
        """VOLUME.json, or the defaults for a new volume.  A damaged file is
        not trusted: it is kept aside as VOLUME.json.damaged, one WARNING
        says what is wrong with it, and the volume is verified by the hub."""
        job_id, target, filter_node = qemu_names(self.node)
        meta = {"format": META_FORMAT, "volume": self.name, "node": self.node,
                "job_id": job_id, "target_node": target, "filter_node": filter_node,
                "mirror": False, "needs_verify": False}
        try:
            with open(self.meta_path, "rb") as f:
                raw = f.read(MAX_META_SIZE + 1)
        except FileNotFoundError:
            self.meta_missing = True
            return meta
        saved, problem = parse_meta(raw)
        if problem is None and saved.get("format", 1) > META_FORMAT:
            raise ValueError(f"{self.meta_path}: format {saved['format']} was written by a "
                             f"newer repagent (this one reads format {META_FORMAT})")
        if problem is None:
            if saved.get("node") != self.node:
                raise ValueError(f"{self.meta_path}: volume {self.name!r} belongs to node "
                                 f"{saved.get('node')!r}, not {self.node!r}")
            meta.update(saved)
            meta["format"] = META_FORMAT
            return meta
        # The evidence is copied aside, then replaced by a file that says
        # "verify": a crash in between finds the damaged file again.
        aside = self.meta_path + ".damaged"
        fd = private_open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with open(fd, "wb") as f:
            f.write(raw)
        log.warning("volume %s: state file %s is damaged (%s): not trusted, kept as %s; "
                    "the volume attaches UNKNOWN so that the hub verifies it", self.name,
                    self.meta_path, problem, aside)
        meta["needs_verify"] = True
        self.meta = meta
        self.save_meta()
        return meta

    def open_bitmap(self, size: int, chunk_size: int, fsync: bool = False) -> None:
        """Open (or create) the volume's dirty bitmap (main thread, at start).

        A bitmap whose body fails its block CRCs may have lost marks: the
        volume attaches UNKNOWN (the hub verifies it by checksums).  That is
        recorded in VOLUME.json before the CRCs are made to match again, so a
        crash in between finds the damage again rather than forgetting it."""
        self.size = size
        self.bitmap = DirtyBitmap(self.bitmap_path, size, chunk_size, fsync)
        if self.bitmap.chunk_bits.torn:
            log.info("volume %s: %d block(s) of bitmap %s were changing when the agent "
                     "stopped: kept as they are (not damage)", self.name,
                     self.bitmap.chunk_bits.torn, self.bitmap_path)
        if self.bitmap.created and self.meta.get("mirror"):
            self.meta["needs_verify"] = True   # state lost: bitmap gone, job was ours
        if self.meta_missing and not self.bitmap.created:
            # Whatever it said (a verify still owed, say) is lost with it.
            log.warning("volume %s: state file %s is missing but its bitmap is not: the "
                        "volume attaches UNKNOWN so that the hub verifies it", self.name,
                        self.meta_path)
            self.meta["needs_verify"] = True
            self.save_meta()
        if self.bitmap.damaged:
            chunks = ", ".join(f"{a}-{b - 1}" for a, b in self.bitmap.damaged_chunks()[:4])
            log.warning("volume %s: bitmap %s is damaged (%d of %d CRC blocks fail, "
                        "chunks %s%s): its marks are not trusted; the volume attaches "
                        "UNKNOWN so that the hub verifies it", self.name, self.bitmap_path,
                        len(self.bitmap.damaged), self.bitmap.chunk_bits.blocks, chunks,
                        ", ..." if len(self.bitmap.damaged) > 4 else "")
            self.meta["needs_verify"] = True
            self.save_meta()
            self.bitmap.reseal()

    def save_meta(self) -> None:
        tmp = self.meta_path + ".tmp"
        fd = private_open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with open(fd, "w", encoding="utf-8") as f:
            json.dump(self.meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.meta_path)

    @property
    def role(self) -> str:
        """protected / demoted (promoted at the recovery site) / failing back."""
        if self.failback is not None:
            return "failing back"
        return "demoted" if self.plan == p.SyncPlan.DEMOTED else "protected"

    def phase(self, conn: "HubConnection") -> p.VolumePhase:
        """What the volume, attached on ``conn``, is there (PROTOCOL.md "Volume
        phases"): FAILING_BACK only once its FAILBACK_BEGIN on ``conn`` is ACKed."""
        if self.plan != p.SyncPlan.DEMOTED:
            return p.VolumePhase.PROTECTED
        fb = self.failback
        if fb is not None and fb.client is not None and fb.conn is conn:
            return p.VolumePhase.FAILING_BACK
        return p.VolumePhase.DEMOTED

    def attach_state(self) -> p.VolumeState:
        if self.meta.get("needs_verify"):
            return p.VolumeState.UNKNOWN
        return p.VolumeState.DIRTY if self.bitmap.dirty_count else p.VolumeState.CLEAN

    def must_hold(self, start: int, end: int) -> bool:
        """A write to [start, end) waits if a read window or an earlier held
        write overlaps it (writes to one region keep their order)."""
        return (any(w.start < end and start < w.end for w in self.windows)
                or any(m.offset < end and start < m.offset + m.length
                       for m, _, _ in self.held))


class TargetHandler(nbd.Handler):
    """The NBD export QSD's mirror writes into; runs on the nbd-conn threads.

    Threads::

        *                    nbd-conn-VOLUME-N
    """

    def __init__(self, stream: "Stream", volume: Volume):
        self.stream, self.volume = stream, volume

    def write(self, offset, data, reply):
        self.stream.protected_write(self.volume, offset, len(data), data, reply)

    def write_zeroes(self, offset, length, reply):
        self.stream.protected_write(self.volume, offset, length, None, reply)

    def flush(self, reply):
        # QEMU never forwards guest flushes to a mirror target (docs/QEMU.md
        # "What reaches the target"); durability is the hub's ACK, tracked
        # per write.  Nothing to wait for.
        reply(0)

    def read(self, offset, length, reply):
        # The mirror never reads its target; answer from the source anyway.
        try:
            reply(0, self.volume.read_once(offset, length))
        except OSError as err:
            log.warning("NBD read on target of %s failed: %s", self.volume.name, err)
            reply(err.errno or errno.EIO)


# ---------------------------------------------------------------------------
# The hub connection


class LinkState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    STOPPED = "stopped"


class HandshakeError(Exception):
    """The hub refused us or proved nothing (wrong secret, version...)."""


class HubConnection:
    """One TCP (or TLS) connection to the hub, after AUTH_OK.

    Owns the send queue (frames in stream order), the ``repagent-send``
    thread that drains it and the ``repagent-recv`` thread that reads.
    ``put`` is called with ``Stream.lock`` held and never blocks.  A request
    of the hub whose id equals one of its requests not yet answered closes
    the connection (PROTOCOL.md [RP-12]): the hub could not tell the two
    answers apart, and a READ_REPLY decides what it stores.

    Threads::

        start, healthy           repagent-heartbeat (a new connection; --hub-timeout)
        put                      any thread, with Stream.lock held (nbd-conn-VOLUME-N,
                                 repagent-recv, repagent-sync-N, repagent-heartbeat); never
                                 blocks
        send_direct              any thread: repagent-heartbeat (handshake), repagent-recv (ERROR),
                                 main (GOODBYE)
        heard, with_hub_reason   repagent-recv
        close                    any thread, once
        join                     repagent-heartbeat, and main at stop
    """

    def __init__(self, link: "HubLink", sock: socket.socket, peer: str, hub_id: str,
                 features: p.Feature = p.Feature.NONE):
        self.link, self.sock, self.peer, self.hub_id = link, sock, peer, hub_id
        self.features = features        # granted in HELLO_REPLY
        self.legal = p.legality(p.Side.AGENT, features)   # what the agent takes (ER-5, VN-6)
        self.queue: collections.deque = collections.deque()
        self.queued_bytes = 0
        self.cond = threading.Condition(link.stream.lock)
        self.send_lock = threading.Lock()
        self.outstanding = p.PeerRequests()  # the hub's requests not yet answered (RP-12)
        self.closed = threading.Event()
        self.ended = threading.Event()   # set once connection_lost has run
        self.last_rx = time.monotonic()
        self.connected_at = time.time()
        self.last_ping = 0.0
        self.rtt: float | None = None
        self.since = time.monotonic()    # connected_at, on the monotonic clock
        self.attached_at: float | None = None   # first ATTACHED (monotonic)
        self.hub_said = ""              # the last ERROR or GOODBYE text the hub sent
        self.refused_writes = 0         # writes the hub answered with ERROR here
        self.hub_said_at = 0.0          # ... and when (monotonic)
        self.threads = [
            threading.Thread(target=self._send_loop, name="repagent-send", daemon=True),
            threading.Thread(target=self._recv_loop, name="repagent-recv", daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def put(self, msg: p.Message, nbytes: int, volume: Volume | None) -> None:
        """Queue one frame (caller holds Stream.lock)."""
        self.queue.append((msg, nbytes, volume))
        self.queued_bytes += nbytes
        if volume is not None:
            volume.queued_frames += 1
            volume.queued_bytes += nbytes
        self.cond.notify()

    def send_direct(self, msg: p.Message) -> None:
        """Send outside the queue (handshake, last words).  Any thread."""
        with self.send_lock:
            log.debug("--> %s", msg.describe())
            self.outstanding.answering(msg)
            p.send_message(self.sock, msg)

    def _send_loop(self) -> None:
        """repagent-send thread: pop frames in order and send them."""
        stream = self.link.stream
        try:
            while True:
                with stream.lock:
                    while not self.queue and not self.closed.is_set():
                        self.cond.wait(1.0)
                    if self.closed.is_set():
                        return
                    msg, nbytes, volume = self.queue.popleft()
                    if volume is not None and msg is volume.drop_report:
                        stream.fill_drop_report(volume)
                with self.send_lock:
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("--> %s", msg.describe())
                    self.outstanding.answering(msg)
                    p.send_message(self.sock, msg)
                with stream.lock:
                    if self is not stream.conn:
                        continue        # connection_lost already reset the counters
                    self.queued_bytes -= nbytes
                    if volume is not None:
                        volume.queued_frames -= 1
                        volume.queued_bytes -= nbytes
        except OSError as err:
            self.close(f"send failed: {err}")
        except Exception as err:   # a bug must cost the connection, not the thread silently
            log.exception("send thread failed")
            self.close(f"send thread failed: {type(err).__name__}: {err}")

    def _recv_loop(self) -> None:
        """repagent-recv thread: read frames one after the other, dispatch them."""
        header_buf = bytearray(p.HEADER_SIZE)
        reader = p.FrameReader(self.sock)
        try:
            while not self.closed.is_set():
                try:
                    msg = p.recv_message(reader, header_buf, legal=self.legal)
                except p.RequestError as err:
                    log.warning("hub %s sent a bad frame: %s", self.peer, err)
                    self.link.count_error("bad_frame")
                    if p.may_answer_with_error(err):
                        self.link.stream.answer(self, p.Error.from_exception(err))
                    continue
                if msg is None:
                    self.close(self.with_hub_reason("hub closed the connection"))
                    return
                self.last_rx = time.monotonic()
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("<-- %s", msg.describe())
                self.outstanding.received(msg)   # no lock: see PeerRequests
                handler = self.link.handlers.get(msg.TYPE)
                if handler is None:   # RECOVER_READY, RREAD_REPLY: no such request here
                    self.link.stream.answer(self, unasked(msg))
                    continue
                handler(self, msg)
        except p.ProtocolError as err:
            log.warning("hub %s broke the protocol: %s", self.peer, err)
            self.link.count_error("protocol")
            try:
                self.send_direct(p.Error(code=p.ErrorCode.PROTOCOL, message=str(err)))
            except OSError:
                pass
            self.close(f"protocol error: {err}")
        except OSError as err:
            self.close(self.with_hub_reason(f"receive failed: {err}"))
        except Exception as err:
            log.exception("recv thread failed")
            self.close(f"recv thread failed: {type(err).__name__}: {err}")

    def with_hub_reason(self, reason: str) -> str:
        """``reason`` plus the last ERROR/GOODBYE the hub sent, if any: a hub
        that refuses something and then closes says why in that ERROR."""
        if not self.hub_said:
            return reason
        return f"{reason} {time.monotonic() - self.hub_said_at:.1f}s after {self.hub_said}"

    def heard(self, what: str) -> None:
        """The hub sent an ERROR or GOODBYE (recv thread): kept for the close reason."""
        self.hub_said, self.hub_said_at = what, time.monotonic()

    def healthy(self, now: float) -> bool:
        """A volume has been attached for HEALTHY_CONNECTION seconds."""
        return self.attached_at is not None and now - self.attached_at >= HEALTHY_CONNECTION

    def close(self, reason: str) -> None:
        """Any thread: tear the connection down once; the agent forgets it."""
        if self.closed.is_set():
            return
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.link.connection_lost(self, reason)
        with self.link.stream.lock:
            self.cond.notify_all()
        self.ended.set()

    def join(self, timeout: float) -> None:
        for t in self.threads:
            # Not started: closed by Agent.stop while the heartbeat thread was
            # between making it current and starting it (they exit at once).
            if t is not threading.current_thread() and t.ident is not None:
                t.join(timeout)
        self.sock.close()


# ---------------------------------------------------------------------------
# The agent


@dataclasses.dataclass
class Config:
    hub: tuple[str, int]
    agent_id: str
    secret: bytes
    qmp: str
    nodes: list[tuple[str, str]]
    state_dir: str
    mode: str = "async"
    chunk_size: int = DEFAULT_CHUNK
    sync_timeout: float = DEFAULT_SYNC_TIMEOUT
    hub_timeout: float = DEFAULT_HUB_TIMEOUT
    max_queue: int = DEFAULT_MAX_QUEUE
    tls_ca: str | None = None
    sources: dict = dataclasses.field(default_factory=dict)
    reconnect_delay: int = DEFAULT_RECONNECT_DELAY
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    unprotect_on_exit: bool = False
    fsync_bitmap: bool = False
    accept_failback: bool = False
    max_backoff: float = BACKOFF_MAX

    @property
    def ping_interval(self) -> float:
        return max(0.2, min(2.0, self.hub_timeout / 4))


def handshake(sock, agent_id: str, secret: bytes,
              features: p.Feature = p.Feature.NONE) -> tuple[str, p.Feature]:
    """HELLO -> HELLO_REPLY (check the hub's proof) -> AUTH -> AUTH_OK.

    PROTOCOL.md "Handshake phase", the agent's side, on a fresh blocking
    socket.  Offers ``features``; returns the hub id and the granted features.
    """
    nonce = os.urandom(p.NONCE_SIZE)
    offered = int(features)
    p.send_message(sock, p.Hello(nonce=nonce, agent_id=agent_id, features=offered))
    try:
        reply = p.recv_message(sock, handshake=True)   # PROTOCOL.md [SE-3]
    except p.BadMagic as err:
        if "TLS" in str(err):
            raise HandshakeError("the hub expects TLS: use --tls-ca") from err
        raise
    except ConnectionResetError as err:
        raise HandshakeError("the hub closed the connection without answering HELLO (a hub "
                             "started with --tls-cert needs --tls-ca here)") from err
    if reply is None:
        raise HandshakeError("the hub closed the connection without answering HELLO (a hub "
                             "started with --tls-cert needs --tls-ca here)")
    if isinstance(reply, p.Error):
        raise HandshakeError(f"hub refused HELLO: {reply.code_name()} {reply.message}")
    if not isinstance(reply, p.HelloReply):
        raise HandshakeError(f"expected HELLO_REPLY, got {reply.TYPE.name}")
    if reply.version not in p.SUPPORTED_VERSIONS:
        problem = (f"hub chose version {reply.version}, expected one of "
                   f"{p.SUPPORTED_VERSIONS}")
        p.send_message(sock, p.Error(code=p.ErrorCode.VERSION, message=problem,
                                     failed_type=p.MsgType.HELLO_REPLY))
        raise HandshakeError(problem)                          # PROTOCOL.md [HS-4]
    if reply.features & ~offered:
        problem = (f"hub granted feature bits 0x{reply.features & ~offered:x} "
                   f"that were not offered (offered 0x{offered:x})")
        p.send_message(sock, p.Error(code=p.ErrorCode.UNSUPPORTED, message=problem,
                                     failed_type=p.MsgType.HELLO_REPLY))
        raise HandshakeError(problem)                          # PROTOCOL.md [VN-4]
    expected = p.hub_proof(secret, nonce, reply.nonce, agent_id, reply.hub_id)
    if not p.proof_matches(expected, reply.proof):
        p.send_message(sock, p.Error(code=p.ErrorCode.AUTH_FAILED,
                                     failed_type=p.MsgType.HELLO_REPLY,
                                     message="hub proof does not match our secret"))
        raise HandshakeError(f"hub {reply.hub_id!r} failed to prove it knows our "
                             "secret (wrong --secret-file, or not our hub)")
    p.send_message(sock, p.Auth(proof=p.agent_proof(
        secret, nonce, reply.nonce, agent_id, reply.hub_id)))
    ok = p.recv_message(sock, handshake=True)
    if isinstance(ok, p.Error):
        raise HandshakeError(f"hub refused AUTH: {ok.code_name()} {ok.message}")
    if not isinstance(ok, p.AuthOk):
        raise HandshakeError(f"expected AUTH_OK, got {ok.TYPE.name if ok else 'EOF'}")
    return reply.hub_id, p.Feature(reply.features)


def connect_to_hub(cfg, features: p.Feature = p.Feature.NONE
                   ) -> tuple[socket.socket, str, p.Feature]:
    """Open an authenticated connection to ``cfg.hub`` (TLS when ``cfg.tls_ca``).

    Returns the socket, still with ``cfg.hub_timeout`` as its timeout, the
    hub's id and the features it granted of ``features``; on any failure the
    socket is closed and the error raised.
    """
    host, port = cfg.hub
    sock = socket.create_connection((host, port), timeout=cfg.hub_timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if cfg.tls_ca:
            # The certificate must chain to --tls-ca and name HOST; the
            # HMAC handshake then runs inside TLS as without it.
            ctx = ssl.create_default_context(cafile=cfg.tls_ca)
            try:
                sock = ctx.wrap_socket(sock, server_hostname=host)
            except ssl.SSLError as err:
                if err.reason == "WRONG_VERSION_NUMBER":   # a frame, not a TLS record
                    raise HandshakeError("the hub does not speak TLS: drop --tls-ca, or start "
                                         "the hub with --tls-cert/--tls-key") from err
                raise
        return sock, *handshake(sock, cfg.agent_id, cfg.secret, features)
    except BaseException:
        sock.close()
        raise


class Stream:
    """The ordered stream to the hub and the protected write path.

    Entered from the nbd-conn threads (protected_write), the repagent-timer
    thread (timer_loop), and, with ``lock`` held, from every thread that
    queues a frame (enqueue) or settles a write (acked).  It owns ``lock``,
    which guards the stream state below, every volume's bitmap (not locked
    itself), pending writes and held frames, and the current connection's
    queue; the connection's ``cond`` and ``timer_cond`` are conditions on
    it.  Lock order: ``QemuSide.mirror_lock`` before ``lock``; ``error_lock``
    is a leaf.

    Threads::

        protected_write      nbd-conn-VOLUME-N
        timer_loop           repagent-timer
        fill_drop_report     repagent-send, with lock held
        acked                repagent-recv, with lock held
        volume_for, answer   any thread; takes lock
        *                    any thread, with lock held
    """

    def __init__(self, cfg: Config, volumes: list[Volume], stopping: threading.Event):
        self.cfg = cfg
        self.volumes = volumes
        self.stopping = stopping
        self.lock = threading.Lock()
        self.seq = 1                 # last stream sequence number given out
        self._req = 0
        self.conn: HubConnection | None = None   # the attached link, if any
        self.by_id: dict[int, Volume] = {}       # its attached volumes, by volume id
        self.pending: dict[int, PendingWrite] = {}
        self.sync_waits: collections.deque[PendingWrite] = collections.deque()
        self.timer_cond = threading.Condition(self.lock)
        self.degraded = cfg.mode == "sync"   # until the first connection is attached
        self.last_ack = 0.0

    # -- identifiers -----------------------------------------------------------

    def next_req(self) -> int:
        """A fresh non-zero request id (any thread, lock held)."""
        self._req = self._req % ((1 << 64) - 1) + 1
        return self._req

    def enqueue(self, conn: HubConnection, msg: p.Message, nbytes: int = 0,
                 volume: Volume | None = None) -> int:
        """Give the frame the next stream sequence number and queue it (any
        thread, lock held)."""
        self.seq += 1
        conn.put(msg, nbytes, volume)
        return self.seq

    def answer(self, conn: HubConnection, msg: p.Message) -> None:
        """Queue ``msg`` if ``conn`` is still the attached link (any thread,
        lock taken here): an answer for a connection that ended goes nowhere."""
        with self.lock:
            if conn is self.conn:
                self.enqueue(conn, msg)

    def volume_for(self, conn: HubConnection, msg: p.Message) -> Volume:
        """The volume ``msg`` names on ``conn`` (any thread, lock taken here), if
        its phase there takes ``msg`` (PROTOCOL.md "Volume phases"); else
        RequestError: NO_SUCH_VOLUME, or BAD_PHASE for a fail-back message."""
        with self.lock:
            vol = self.by_id.get(msg.volume) if conn is self.conn else None
            phase = vol.phase(conn) if vol is not None else p.VolumePhase.NONE
        p.check_volume_phase(msg, p.Side.AGENT, phase,
                             f"volume id {msg.volume}" if vol is None else f"volume {vol.name}")
        return vol

    # -- the write path (nbd-conn threads) -------------------------------------

    def protected_write(self, vol: Volume, offset: int, length: int,
                        data: memoryview | None, reply: Callable[[int], None]) -> None:
        """A write from QSD (data None: write zeroes).  Runs on an nbd-conn thread.

        Marks its 4 KiB blocks, then queues the frame (or holds it behind a
        read window, or drops it), all under the lock; answers QEMU now unless
        sync mode waits for the hub's ACK.
        """
        bitmap = vol.bitmap
        span = bitmap.block_span(offset, length)
        answer_now = True
        with self.lock:
            bitmap.mark(span)
            vol.counters["writes"] += 1
            conn = self.conn
            if conn is None or vol.volume_id is None:
                bitmap.lose(span, self.seq)
                vol.counters["untracked_writes"] += 1
            elif vol.plan == p.SyncPlan.DEMOTED:
                # Promoted at the recovery site: the hub takes no writes of
                # ours; the marks are what a fail-back collects (late writes).
                bitmap.lose(span, self.seq)
                vol.counters["demoted_writes"] += 1
            elif data is not None and conn.queued_bytes + length > self.cfg.max_queue:
                bitmap.lose(span, self.seq)
                self.report_dropped(conn, vol, span)
                vol.counters["dropped_writes"] += 1
                if vol.counters["dropped_writes"] == 1 or not self.degraded:
                    log.warning("send queue full (%d bytes): %s off=%d len=%d only marked; "
                                "the hub will resync it", conn.queued_bytes, vol.name,
                                offset, length)
                self.degrade("send queue full")
            else:
                req = self.next_req()
                if data is None:
                    msg = p.Zero(request_id=req, volume=vol.volume_id, offset=offset,
                                 length=length)
                    nbytes = 0
                else:
                    msg = p.Write(request_id=req, volume=vol.volume_id, offset=offset,
                                  length=length, data=data)
                    nbytes = length
                wait = self.cfg.mode == "sync" and not self.degraded
                pw = PendingWrite(req, vol, span, length, reply if wait else None)
                bitmap.add_inflight(span)
                self.pending[req] = pw
                if vol.must_hold(offset, offset + length):
                    vol.held.append((msg, nbytes, pw))
                    conn.queued_bytes += nbytes   # held data counts toward --max-queue
                    vol.counters["held_writes"] += 1
                else:
                    self.enqueue(conn, msg, nbytes, vol)
                vol.counters["sent_writes"] += 1
                vol.counters["sent_bytes"] += nbytes
                if wait:
                    answer_now = False
                    pw.deadline = time.monotonic() + self.cfg.sync_timeout
                    self.sync_waits.append(pw)
                    if len(self.sync_waits) == 1:
                        self.timer_cond.notify()
        if answer_now:
            reply(0)

    def degrade(self, cause: str) -> None:
        """Sync mode stops waiting for ACKs (any thread, lock held)."""
        if self.cfg.mode == "sync" and not self.degraded:
            self.degraded = True
            if self.stopping.is_set():
                return
            log.warning("sync mode degraded (%s): writes are answered once marked until "
                        "a resync catches up", cause)

    def maybe_undegrade(self) -> None:
        """Leave degraded mode once attached, nothing waits for a resync and
        every write answered early is ACKed (any thread, lock held)."""
        if (self.degraded and self.cfg.mode == "sync" and self.conn is not None
                and not self.stopping.is_set()
                and all(v.volume_id is not None and not v.bitmap.has_losses and not v.held
                        for v in self.volumes)
                and all(pw.reply is not None for pw in self.pending.values())):
            self.degraded = False
            log.info("sync mode restored: every write is acknowledged by the hub again")

    def timer_loop(self) -> None:
        """repagent-timer thread: answer sync-mode writes whose ACK is late."""
        while not self.stopping.is_set():
            late = []
            with self.lock:
                while self.sync_waits and self.sync_waits[0].reply is None:
                    self.sync_waits.popleft()
                if not self.sync_waits:
                    self.timer_cond.wait(1.0)
                    continue
                now = time.monotonic()
                head = self.sync_waits[0]
                if head.deadline > now:
                    self.timer_cond.wait(head.deadline - now)
                    continue
                while self.sync_waits and self.sync_waits[0].deadline <= now:
                    pw = self.sync_waits.popleft()
                    if pw.reply is not None:
                        late.append(pw.reply)
                        pw.reply = None
                if late:
                    self.degrade(f"no ACK within --sync-timeout {self.cfg.sync_timeout}s")
            for reply in late:
                reply(0)

    # -- drop reports (lock held: nbd-conn, repagent-recv, repagent-send) ---------

    def report_dropped(self, conn: HubConnection, vol: Volume, span: Span) -> None:
        """A write of ``vol`` over ``span`` was dropped or refused (lock held):
        queue the unsolicited DIRTY_MAP that reports it now, ahead of every
        later frame, unless one is queued already: it will carry these chunks
        too [SY-19].  Its extents (the marked blocks of the chunks dropped
        into) are filled in when it is sent."""
        vol.dropped.update(vol.bitmap.chunks_of(span))
        if vol.drop_report is None:
            vol.drop_report = p.DirtyMap(volume=vol.volume_id, extents=[])
            self.enqueue(conn, vol.drop_report, 0, vol)

    def fill_drop_report(self, vol: Volume) -> None:
        """Its drop report is about to be sent (repagent-send thread, lock held):
        every region dropped so far goes in it."""
        report, vol.drop_report = vol.drop_report, None
        report.extents = vol.bitmap.extents(vol.dropped)
        vol.dropped.clear()
        log.info("--> DIRTY_MAP vol=%d (unsolicited): %d extents dropped or refused",
                 report.volume, len(report.extents))

    def acked(self, request_id: int) -> PendingWrite | None:
        """Recv loop, lock held: an ACK for ``request_id``.  If it settles a
        pending WRITE/ZERO its chunks may clear and it is returned (the caller
        answers QEMU if sync mode still waits); otherwise None."""
        pw = self.pending.pop(request_id, None)
        if pw is not None:
            pw.volume.bitmap.ack(pw.span)
            self.last_ack = time.monotonic()
            if self.degraded:
                self.maybe_undegrade()
        return pw



class SyncServer:
    """The hub's reads of the protected volume (repagent-sync-N threads).

    READ, CHECKSUM_QUERY, EXTENT_QUERY and DIRTY_QUERY are handed over by the
    recv loop (``submit``) and served here, so that ACKs keep flowing while
    QSD is read.  Each read runs under a read window (rule 4, docs/DESIGN.md
    "The rules that make it correct"); its reply is remembered with the
    stream position it was queued at, so that the hub's SYNCED for it
    (``synced``, recv thread) can forget the losses it repairs.  ``replies``
    is guarded by the stream's lock and forgotten with the connection.

    Threads::

        submit, synced       repagent-recv
        forget               any thread, with Stream.lock held (the connection ended)
        threads              main (start, stop)
        *                    repagent-sync-N
    """

    def __init__(self, stream: Stream, stopping: threading.Event):
        self.stream = stream
        self.stopping = stopping
        self.work: queue.Queue = queue.Queue()     # (conn, request) in arrival order
        self.replies: collections.OrderedDict = collections.OrderedDict()  # req -> (vol, seq)

    def threads(self) -> list[tuple[str, Callable[[], None]]]:
        return [(f"repagent-sync-{i}", self.run) for i in range(SYNC_WORKERS)]

    def submit(self, conn: HubConnection, msg: p.Message) -> None:
        """A sync request from the hub (repagent-recv thread)."""
        self.work.put((conn, msg))

    def forget(self) -> None:
        """The connection ended (lock held): no SYNCED can come for our replies."""
        self.replies.clear()

    def synced(self, conn: HubConnection, msg: p.Synced) -> None:
        """Our reply to READ/CHECKSUM_QUERY/EXTENT_QUERY ``req`` is durable: forget
        older losses."""
        with self.stream.lock:
            entry = self.replies.get(msg.request_id)
            vol = self.stream.by_id.get(msg.volume)
            if entry is None or vol is None or entry[0] is not vol:
                log.debug("SYNCED req=%d: no reply of ours on this connection", msg.request_id)
                return
            if vol.plan == p.SyncPlan.DEMOTED:
                # A demoted volume's hub keeps what it reads aside (late writes),
                # it does not apply it: nothing is synced, the marks stay.
                return
            end = msg.offset + msg.length
            if msg.length == 0 or end > vol.size:
                return
            # Only the 4 KiB blocks the range covers whole (the last one may end
            # at the volume's end): a partial read says nothing of the rest of one.
            vol.bitmap.synced(vol.bitmap.covered_span(msg.offset, msg.length), entry[1])
            vol.counters["synced_bytes"] += msg.length
            if self.stream.degraded:
                self.stream.maybe_undegrade()

    def run(self) -> None:
        """repagent-sync-N thread: serve READ / CHECKSUM_QUERY / EXTENT_QUERY / DIRTY_QUERY."""
        readers: dict[str, object] = {}
        try:
            while not self.stopping.is_set():
                try:
                    conn, msg = self.work.get(timeout=0.5)
                except queue.Empty:
                    continue
                try:
                    getattr(self, f"serve_{msg.TYPE.name}")(conn, msg, readers)
                except p.RequestError as err:
                    err.request_id, err.msg_type = msg.request_id, msg.TYPE
                    self.stream.answer(conn, p.Error.from_exception(err))
                except Exception as err:   # OSError from QSD, or a bug: answer, go on
                    if not isinstance(err, OSError):
                        log.exception("%s failed", msg.describe())
                    else:
                        log.warning("%s failed: %s", msg.describe(), err)
                    self.stream.answer(conn, p.Error(request_id=msg.request_id,
                                                     code=p.ErrorCode.IO_ERROR,
                                                     failed_type=msg.TYPE, message=str(err)))
        finally:
            for reader in readers.values():
                reader.close()

    def _reader(self, vol: Volume, readers: dict):
        if vol.name not in readers:
            readers[vol.name] = vol.source()
        return readers[vol.name]

    @contextlib.contextmanager
    def read_window(self, conn, msg: p.Message, readers):
        """Serve ``msg`` (READ, CHECKSUM_QUERY, EXTENT_QUERY) under a read window over
        its range: yields (volume, reader, window).  A guest write overlapping
        the window is held back; as the window closes, the answer given with
        ``window.answer`` is queued, then the writes it held [SY-2, SY-16]."""
        vol = self.stream.volume_for(conn, msg)
        p.check_range(msg.offset, msg.length, vol.size, msg.TYPE.name)
        reader = self._reader(vol, readers)
        window = ReadWindow(msg.offset, msg.offset + msg.length, conn)
        with self.stream.lock:
            vol.windows.append(window)
        try:
            yield vol, reader, window
        finally:
            self._close_window(vol, window)

    def _close_window(self, vol: Volume, window: ReadWindow) -> None:
        """Queue the window's answer, then the writes held behind it (lock taken here)."""
        with self.stream.lock:
            vol.windows.remove(window)
            conn = self.stream.conn
            if conn is None or vol.volume_id is None:
                return          # connection_lost dropped the held writes already
            reply = window.reply
            if reply is not None and window.conn is conn:
                seq = self.stream.enqueue(conn, reply, window.nbytes, vol)
                self.replies[reply.request_id] = (vol, seq)
                while len(self.replies) > MAX_SYNCED_MEMORY:
                    self.replies.popitem(last=False)
            # Held writes belong to the current connection (a window of an
            # older one may still hold them back): release what is free now.
            if vol.held:
                still = collections.deque()
                held, vol.held = vol.held, still
                for msg, held_bytes, pw in held:
                    if vol.must_hold(msg.offset, msg.offset + msg.length):
                        still.append((msg, held_bytes, pw))   # checked against `still` too
                    else:
                        conn.queued_bytes -= held_bytes
                        self.stream.enqueue(conn, msg, held_bytes, vol)

    def serve_READ(self, conn, msg: p.Read, readers) -> None:
        with self.read_window(conn, msg, readers) as (vol, reader, window):
            data = reader.read(msg.offset, msg.length)
            if p.is_zero(data):
                window.answer(p.ReadReply(request_id=msg.request_id, volume=msg.volume,
                                          offset=msg.offset, length=msg.length,
                                          flags=p.FLAG_ZERO))
                vol.counters["zero_replies"] += 1
            else:
                window.answer(p.ReadReply(request_id=msg.request_id, volume=msg.volume,
                                          offset=msg.offset, length=msg.length, data=data),
                              len(data))
            vol.counters["read_replies"] += 1
            vol.counters["read_reply_bytes"] += window.nbytes

    def serve_CHECKSUM_QUERY(self, conn, msg: p.ChecksumQuery, readers) -> None:
        with self.read_window(conn, msg, readers) as (vol, reader, window):
            digests = []
            piece = max(msg.chunk_size, CHECKSUM_PIECE // msg.chunk_size * msg.chunk_size)
            end = msg.offset + msg.length
            for start in range(msg.offset, end, piece):
                data = memoryview(reader.read(start, min(piece, end - start)))
                for i in range(0, len(data), msg.chunk_size):
                    digests.append(hashlib.sha256(data[i:i + msg.chunk_size]).digest())
            window.answer(p.Checksums(request_id=msg.request_id, volume=msg.volume,
                                      offset=msg.offset, length=msg.length,
                                      chunk_size=msg.chunk_size, algorithm=msg.algorithm,
                                      digests=digests))

    def serve_EXTENT_QUERY(self, conn, msg: p.ExtentQuery, readers) -> None:
        """Which runs of the range read as zeroes (PROTOCOL.md "EXTENT_QUERY").

        Asked under a read window, like a READ: a zero extent reflects every
        write queued before the EXTENTS frame, and a write it may not reflect
        is held until the frame is queued [SY-16].  Adjacent runs of one kind
        are merged; a reply too long for one frame describes a prefix.
        """
        with self.read_window(conn, msg, readers) as (vol, reader, window):
            runs: list[list] = []
            for n, zero in reader.extents(msg.offset, msg.length):
                if runs and runs[-1][1] == zero:
                    runs[-1][0] += n
                elif len(runs) < MAX_EXTENTS:
                    runs.append([n, zero])
                else:
                    break
            if not runs:
                raise OSError(errno.EIO, f"{vol.name}: no extent at offset {msg.offset}")
            extents = [(n, p.EXTENT_ZERO if zero else 0) for n, zero in runs]
            window.answer(p.Extents(request_id=msg.request_id, volume=msg.volume,
                                    offset=msg.offset, length=msg.length, extents=extents))
            vol.counters["extent_replies"] += 1
            vol.counters["zero_extent_bytes"] += sum(n for n, zero in runs if zero)

    def serve_DIRTY_QUERY(self, conn, msg: p.DirtyQuery, readers) -> None:
        vol = self.stream.volume_for(conn, msg)
        with self.stream.lock:
            extents = vol.bitmap.extents()
            if conn is self.stream.conn:
                self.stream.enqueue(conn, p.DirtyMap(request_id=msg.request_id,
                                                     volume=msg.volume, extents=extents))
        log.info("volume %s: DIRTY_MAP of %d extents (%d bytes)", vol.name, len(extents),
                 sum(n for _, n in extents))


class FailbackWorker:
    """The agent's side of a fail-back (PROTOCOL.md "Fail-back"), on the
    repagent-failback thread.

    FAILBACK_BEGIN, PUT and FAILBACK_END are taken in arrival order by one
    thread (the hub keeps several PUTs in flight); QMP and NBD calls block, so
    none of this runs on the recv loop.  ``cut_short`` (a lost connection, the
    agent stopping) leaves a note on the same queue: a fail-back cut short
    ends like an ABORT.  The node is shared with the jobs thread under
    ``QemuSide.mirror_lock``.

    Threads::

        submit               repagent-recv
        cut_short            any thread (a lost connection, the agent stopping)
        stop                 main
        *                    repagent-failback
    """

    def __init__(self, cfg: Config, stream: Stream, qemu: "QemuSide",
                 count_error: Callable[[str], None]):
        self.cfg = cfg
        self.stream = stream
        self.qemu = qemu
        self.count_error = count_error
        self.work: queue.Queue = queue.Queue()   # (conn, msg or Volume, why) in arrival order

    def submit(self, conn: HubConnection, msg: p.Message) -> None:
        """A fail-back request from the hub (repagent-recv thread)."""
        self.work.put((conn, msg, None))

    def cut_short(self, conn: HubConnection, vol: Volume, why: str) -> None:
        """Undo ``vol``'s fail-back on ``conn``, if it still runs (any thread)."""
        self.work.put((conn, vol, why))

    def stop(self) -> None:
        """The thread ends once the notes queued before this are done."""
        self.work.put(None)

    def run(self) -> None:
        """repagent-failback thread; ends on the None that ``stop`` queues."""
        while True:
            item = self.work.get()
            if item is None:
                return
            conn, msg, why = item
            if isinstance(msg, Volume):
                if msg.failback is not None and msg.failback.conn is conn:
                    self._interrupted(msg, why)
                continue
            try:
                getattr(self, f"serve_{msg.TYPE.name}")(conn, msg)
            except p.RequestError as err:
                err.request_id, err.msg_type = msg.request_id, msg.TYPE
                log.warning("%s refused: %s %s", msg.describe(), err.code.name, err)
                self.stream.answer(conn, p.Error.from_exception(err))
            except Exception as err:   # QSD or QMP failed, or a bug: answer, go on
                if isinstance(err, (OSError, QMPError, QMPClosed, nbd.NBDError)):
                    log.warning("%s failed: %s", msg.describe(), err)
                else:
                    log.exception("%s failed", msg.describe())
                self.count_error("failback")
                self.stream.answer(conn, p.Error(request_id=msg.request_id,
                                                 code=p.ErrorCode.IO_ERROR,
                                                 failed_type=msg.TYPE, message=str(err)))

    def _ack(self, conn: HubConnection, msg: p.Message) -> None:
        self.stream.answer(conn, p.Ack(request_id=msg.request_id))

    def _other_writers(self, vol: Volume, ours: int) -> None:
        """Raise ERROR(BUSY) unless exactly ``ours`` users of QSD can write the
        node (PROTOCOL.md [FB-4]; ``node_writers`` says how that is read)."""
        others = node_writers(self.qemu.qmp, vol.node) - ours
        if others > 0:
            exports = [e for e in exports_on(self.qemu.qmp, vol.node, vol.meta["filter_node"])
                       if e != failback_export(vol.name)]
            raise p.RequestError(
                f"node {vol.node} has other writers ({others}; exports: "
                f"{', '.join(exports) or 'none'}); stop the VM and remove its export "
                "(block-export-del) first", code=p.ErrorCode.BUSY)

    def serve_FAILBACK_BEGIN(self, conn: HubConnection, msg: p.FailbackBegin) -> None:
        """Become the only writer of the volume's node, or refuse (FB-3, FB-4, FB-5):
        tear the mirror down, add our writable export, check, connect to it."""
        vol = self.stream.volume_for(conn, msg)     # attached DEMOTED (FB-5)
        if vol.failback is not None:
            raise p.RequestError(f"a fail-back of volume {vol.name} is already running",
                                 code=p.ErrorCode.BAD_PHASE)
        if not self.cfg.accept_failback:
            raise p.RequestError("fail-back not accepted: stop the VM, then restart "
                                 "repagent.py protect with --accept-failback",
                                 code=p.ErrorCode.NOT_ALLOWED)
        if vol.node not in self.cfg.sources:
            raise p.RequestError(f"fail-back writes through QSD's NBD server, which this "
                                 f"agent was not given: restart repagent.py protect with "
                                 f"--source {vol.node}=nbd+unix:///EXPORT?socket=PATH",
                                 code=p.ErrorCode.NOT_ALLOWED)
        address = self.cfg.sources[vol.node][0]
        with self.qemu.mirror_lock:
            self._other_writers(vol, ours=0)        # refuse before touching anything
            with self.stream.lock:
                if conn is not self.stream.conn:
                    return                          # lost meanwhile: nobody to answer
                # From here connection_lost queues the undo, the jobs thread keeps off.
                fb = vol.failback = Failback(conn, failback_export(vol.name))
            escaped = False
            try:
                teardown_mirror(self.qemu.qmp, vol.meta)
                vol.meta["mirror"] = False          # a crash from here on: verify at restart
                vol.save_meta()
                self.qemu.qmp.execute("block-export-add", type="nbd", id=fb.export,
                                      name=fb.export, writable=True,
                                      **{"node-name": vol.node})
                escaped = True
                self._other_writers(vol, ours=1)
                escaped = False
                fb.client = nbd.NBDClient(address, fb.export, timeout=FAILBACK_NBD_TIMEOUT)
            except BaseException:
                if escaped:
                    # A writer appeared after the first check, while no mirror
                    # ran: what it wrote is nowhere in the bitmap.  Every chunk
                    # is marked, so the hub's fail-back keeps all as late writes.
                    log.warning("volume %s: a writer appeared while the mirror was down; "
                                "every chunk is marked dirty", vol.name)
                    with self.stream.lock:
                        vol.bitmap.mark(range(vol.bitmap.chunks))
                        vol.bitmap.lose(range(vol.bitmap.chunks), self.stream.seq)
                    vol.bitmap.sync()
                self._undo(vol)
                raise
        log.info("volume %s: fail-back begins: mirror removed, writable export %s on node "
                 "%s, no other writer", vol.name, fb.export, vol.node)
        self._ack(conn, msg)

    def _running(self, conn: HubConnection, msg: p.Message) -> tuple[Volume, Failback]:
        """The volume of a PUT or FAILBACK_END, failing back on ``conn`` (FB-5)."""
        vol = self.stream.volume_for(conn, msg)
        return vol, vol.failback

    def serve_PUT(self, conn: HubConnection, msg: p.Put) -> None:
        """Mark the range dirty (persistently), write it through our export, ACK (FB-6)."""
        vol, fb = self._running(conn, msg)
        p.check_range(msg.offset, msg.length, vol.size, "PUT")
        # Whole chunks: PUTs come in large pieces, and DONE clears every mark.
        chunks = vol.bitmap.chunk_range(msg.offset, msg.length)
        with self.stream.lock:
            vol.bitmap.mark(chunks)
            vol.bitmap.lose(chunks, self.stream.seq)
        vol.bitmap.sync()       # an interrupted fail-back is found again, even after a crash
        try:
            if not msg.is_zero:
                fb.client.write(msg.offset, msg.data)
            elif fb.client.transmission_flags & nbd.TransmissionFlag.SEND_WRITE_ZEROES:
                fb.client.write_zeroes(msg.offset, msg.length)
            else:
                fb.client.write(msg.offset, bytes(msg.length))
        except nbd.RequestError as err:
            raise OSError(err.error, f"writing export {fb.export}: {err}") from err
        fb.puts += 1
        fb.put_bytes += msg.length
        vol.counters["put_bytes"] += msg.length
        self._ack(conn, msg)

    def serve_FAILBACK_END(self, conn: HubConnection, msg: p.FailbackEnd) -> None:
        """DONE: flush, drop our export, clear the marks, mirror again, stream (FB-7).
        ABORT: drop our export, mirror again, stay DEMOTED with the marks (FB-11)."""
        vol, fb = self._running(conn, msg)
        if msg.outcome == p.FailbackOutcome.ABORT:
            with self.qemu.mirror_lock:
                self._undo(vol)
            log.warning("volume %s: fail-back abandoned by the hub after %d PUTs (%s): still "
                        "demoted, the regions written stay marked", vol.name, fb.puts,
                        fmt_bytes(fb.put_bytes))
            self._ack(conn, msg)
            return
        fb.client.flush()       # every PUT durable before a mark goes
        with self.qemu.mirror_lock:
            try:
                fb.client.close()
                delete_export(self.qemu.qmp, fb.export)
                with self.stream.lock:
                    vol.bitmap.clear_all()      # the disk now equals the hub's volume
                vol.meta["needs_verify"] = False
                self.qemu.mirror_again(vol)
            finally:
                vol.failback = None
        with self.stream.lock:
            if conn is self.stream.conn:
                self.stream.enqueue(conn, p.Ack(request_id=msg.request_id))
                vol.plan = p.SyncPlan.NONE      # WRITEs from the frame after the ACK on
                if vol.bitmap.dirty_count:      # written since the mirror came back
                    self.stream.enqueue(conn, p.DirtyMap(volume=vol.volume_id,
                                                         extents=vol.bitmap.extents()))
                self.stream.maybe_undegrade()
        log.info("volume %s: fail-back done (%d PUTs, %s, in %.1f s): marks cleared, mirror "
                 "set up again, protection resumes; add the VM's export on node %s so that "
                 "its writes are replicated", vol.name, fb.puts, fmt_bytes(fb.put_bytes),
                 time.time() - fb.started, vol.meta["filter_node"])

    def _interrupted(self, vol: Volume, why: str) -> None:
        """A fail-back cut short (connection lost, agent stopping): as ABORT, no ACK."""
        if vol.failback is None:
            return
        fb = vol.failback
        with self.qemu.mirror_lock:
            self._undo(vol)
        log.warning("volume %s: fail-back interrupted (%s) after %d PUTs (%s): export "
                    "removed, mirror set up again, still demoted; the regions written stay "
                    "marked", vol.name, why, fb.puts, fmt_bytes(fb.put_bytes))

    def _undo(self, vol: Volume) -> None:
        """Back to where the BEGIN found the volume: no export of ours, the mirror
        running (mirror_lock held).  Failures are logged; the jobs thread retries
        the mirror, and a mirror set up anew makes the hub verify."""
        fb = vol.failback
        try:
            if fb.client is not None:
                fb.client.close()
            delete_export(self.qemu.qmp, fb.export)
            self.qemu.mirror_again(vol)
        except (OSError, QMPError, QMPClosed, LookupError) as err:
            log.error("volume %s: undoing the fail-back set-up failed: %s", vol.name, err)
            self.count_error("failback")
        finally:
            vol.failback = None


class QemuSide:
    """QSD as the agent drives it over QMP: the mirror jobs, kept running by
    the repagent-jobs thread (docs/QEMU.md).

    ``qmp`` is replaced when QSD comes back after a restart; ``mirror_lock``
    keeps the jobs thread and a fail-back's QMP work apart (it is taken
    before the stream's lock), and the jobs thread and ``unprotect``: once
    that has begun, the jobs thread sets no mirror up again (it would find
    the job cancelled, start a new one into a target about to go away, and
    leave the guest's writes to stall on it).

    Threads::

        connect, unprotect, close  main
        set_up_mirror        main (at start) or repagent-jobs
        mirror_again         repagent-failback, with mirror_lock held
        *                    repagent-jobs
    """

    def __init__(self, cfg: Config, volumes: list[Volume], stream: Stream,
                 stopping: threading.Event, count_error: Callable[[str], None]):
        self.cfg = cfg
        self.volumes = volumes
        self.stream = stream
        self.stopping = stopping
        self.count_error = count_error
        self.mirror_lock = threading.Lock()
        self.unprotected = False     # under mirror_lock: the mirrors are going away
        self.qmp: QMPClient | None = None

    def connect(self) -> QMPClient:
        """The first QMP connection (main thread, at start)."""
        self.qmp = QMPClient(self.cfg.qmp, self._on_event)
        log.info("QMP connected to %s (QEMU %s.%s.%s)", self.cfg.qmp,
                 self.qmp.version.get("major"), self.qmp.version.get("minor"),
                 self.qmp.version.get("micro"))
        return self.qmp

    def unprotect(self) -> None:
        """``protect --unprotect``, at exit: remove every mirror; the hub verifies next time."""
        with self.mirror_lock:
            self.unprotected = True
            for vol in self.volumes:
                try:
                    teardown_mirror(self.qmp, vol.meta)
                    vol.meta["mirror"] = False
                    vol.meta["needs_verify"] = True
                    vol.save_meta()
                except (OSError, QMPError, QMPClosed) as err:
                    log.error("could not tear down the mirror of %s: %s", vol.name, err)

    def close(self) -> None:
        if self.qmp is not None:
            self.qmp.close()

    def _on_event(self, event: dict) -> None:
        """qmp-reader thread: log job faults; the jobs thread does the resuming."""
        if event.get("event") == "BLOCK_JOB_ERROR":
            data = event.get("data", {})
            log.debug("BLOCK_JOB_ERROR %s %s %s", data.get("device"), data.get("operation"),
                      data.get("action"))

    def run(self) -> None:
        """repagent-jobs thread: keep every mirror running; redo it after a QSD restart."""
        while not self.stopping.wait(JOB_POLL_INTERVAL):
            try:
                self.check_jobs()
            except (OSError, QMPError, QMPClosed, LookupError) as err:
                if self.qmp is not None and not self.qmp.closed.is_set():
                    log.warning("mirror check failed: %s", err)
                    self.count_error("qmp")

    def check_jobs(self) -> None:
        """One round of the jobs thread: every volume's ``check_job``."""
        if self.qmp is None or self.qmp.closed.is_set():
            self._reconnect()
        for vol in self.volumes:
            with self.mirror_lock:
                if self._looks_after(vol):
                    self.check_job(vol)

    def _looks_after(self, vol: Volume) -> bool:
        """Under mirror_lock: is vol's mirror the jobs thread's to keep running?
        Not while a fail-back owns the node, nor once ``unprotect`` has begun."""
        return vol.failback is None and not self.unprotected

    def _reconnect(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
            log.warning("QMP connection to %s lost (QSD stopped or restarted)", self.cfg.qmp)
            self.count_error("qmp")
        self.qmp = QMPClient(self.cfg.qmp, self._on_event)
        log.info("QMP connection to %s re-established", self.cfg.qmp)
        for vol in self.volumes:
            with self.mirror_lock:
                if self._looks_after(vol):
                    self.set_up_mirror(vol)

    def check_job(self, vol: Volume) -> None:
        """Record the job's state; resume it if paused; set it up again if gone."""
        job = find_job(self.qmp, vol.meta["job_id"])
        vol.job_info = job or {}
        status = job.get("status") if job else "gone"
        if status != vol.job_status:
            level = logging.INFO if status in ("ready", "running") else logging.WARNING
            log.log(level, "mirror job %s: %s (io-status %s)", vol.meta["job_id"], status,
                    job.get("io-status") if job else "-")
            vol.job_status = status
        if job is None or status in ("concluded", "aborting", "null"):
            self.set_up_mirror(vol)
        elif job_is_paused(job) and not self.stopping.is_set():
            # on-target-error=stop paused it (our target was away): QEMU kept
            # what it could not deliver as dirty and re-copies it on resume.
            self.qmp.execute("block-job-resume", device=vol.meta["job_id"])
        # An export added on the node after the mirror started bypasses the
        # mirror's filter (docs/QEMU.md "Exports and the mirror's filter"):
        # say so, it is silent data loss.
        bypass = node_writers(self.qmp, vol.node, through_filters=False) if job else 0
        if bypass != vol.bypass_writers:
            if bypass:
                log.warning("volume %s: %d writer(s) on node %s below the mirror's filter: "
                            "their writes are neither replicated nor tracked; add exports "
                            "on node %s instead", vol.name, bypass, vol.node,
                            vol.meta["filter_node"])
            vol.bypass_writers = bypass

    def set_up_mirror(self, vol: Volume) -> JobSetup:
        outcome = setup_mirror(self.qmp, vol.meta, vol.target_socket, vol.name,
                               self.cfg.chunk_size, self.cfg.reconnect_delay)
        if outcome == JobSetup.RESTARTED:
            log.warning("volume %s: the mirror job was gone (QSD restarted): guest writes "
                        "may have escaped the bitmap, the hub will verify", vol.name)
            vol.meta["needs_verify"] = True
        elif outcome == JobSetup.STARTED and not vol.bitmap.created:
            # An old bitmap but no mirror (unprotected meanwhile): writes made
            # without the mirror were never tracked.
            log.warning("volume %s: protected again after a pause: the hub will verify",
                        vol.name)
            vol.meta["needs_verify"] = True
        self._mirror_running(vol)
        conn = self.stream.conn
        if outcome == JobSetup.RESTARTED and conn is not None:
            conn.close("QSD restarted: re-attaching with state UNKNOWN")
        return outcome

    def mirror_again(self, vol: Volume) -> None:
        """The mirror after a fail-back (mirror_lock held): fresh, no verify due."""
        setup_mirror(self.qmp, vol.meta, vol.target_socket, vol.name, self.cfg.chunk_size,
                     self.cfg.reconnect_delay)
        self._mirror_running(vol)

    def _mirror_running(self, vol: Volume) -> None:
        """The mirror is set up: VOLUME.json says so; its job is recorded."""
        vol.meta["mirror"] = True
        vol.save_meta()
        job = find_job(self.qmp, vol.meta["job_id"]) or {}
        vol.job_info, vol.job_status = job, job.get("status", "gone")


class HubLink:
    """The agent's side of the hub connection: connect, handshake and ATTACH
    every volume, PING and ``--hub-timeout`` (``run``, repagent-heartbeat,
    the only thread that connects); the hub's frames in one dispatch table
    (``handlers``, repagent-recv), which hands reads to ``sync`` and
    fail-back work to ``failbacks``; and what a lost connection leaves
    (``connection_lost``: every unACKed write stays marked).

    ``requests`` (ATTACH, PING, CHECKPOINT by request id) is guarded by the
    stream's lock; the link state fields are written by the heartbeat thread
    and read by status.

    Threads::

        run                      repagent-heartbeat
        adopt                    main, in tests, instead of the heartbeat thread's connect
        connection_lost          any thread (the one that closes the connection)
        set_link                 repagent-heartbeat, and main at stop (through connection_lost, any
                                 thread)
        *                        repagent-recv: the on_<TYPE> handlers of the dispatch table
    """

    def __init__(self, cfg: Config, volumes: list[Volume], stream: Stream, sync: SyncServer,
                 failbacks: FailbackWorker, stopping: threading.Event,
                 count_error: Callable[[str], None]):
        self.cfg = cfg
        self.volumes = volumes
        self.stream = stream
        self.sync = sync
        self.failbacks = failbacks
        self.stopping = stopping
        self.count_error = count_error
        self.link_state = LinkState.CONNECTING   # until the first attempt ends
        self.link_cause = ""
        self.connect_attempts = 0
        self.last_disconnect: dict | None = None   # why the last connection ended
        self.retry_at: float | None = None         # next connect attempt (monotonic)
        self.requests: dict[int, tuple[str, object]] = {}   # ATTACH / PING / CHECKPOINT
        T = p.MsgType
        #: The dispatch table of the hub's frames (repagent-recv): the sync
        #: requests go to the sync workers, the fail-back ones to its worker,
        #: each in arrival order; the rest is answered here.  EXTENT_QUERY
        #: arrives only where EXTENTS was granted: the codec refuses it
        #: otherwise [VN-6].  Any other type was asked by no request here.
        self.handlers: dict[p.MsgType, Callable[[HubConnection, p.Message], None]] = {
            **dict.fromkeys((T.READ, T.CHECKSUM_QUERY, T.DIRTY_QUERY, T.EXTENT_QUERY),
                            sync.submit),
            **dict.fromkeys((T.FAILBACK_BEGIN, T.PUT, T.FAILBACK_END), failbacks.submit),
            T.SYNCED: sync.synced, T.ACK: self.on_ACK, T.ATTACHED: self.on_ATTACHED,
            T.PING: self.on_PING, T.PONG: self.on_PONG, T.ERROR: self.on_ERROR,
            T.GOODBYE: self.on_GOODBYE}

    # -- the hub's frames (repagent-recv thread) ----------------------------------

    # The on_<TYPE> methods run on the repagent-recv thread, one frame at a
    # time in arrival order; READ/CHECKSUM_QUERY/EXTENT_QUERY/DIRTY_QUERY go to the
    # sync threads so that ACKs keep flowing while QSD is read.

    def on_ACK(self, conn: HubConnection, msg: p.Ack) -> None:
        """A WRITE/ZERO is durable: its chunks may clear; sync mode answers QEMU."""
        reply = None
        with self.stream.lock:
            pw = self.stream.acked(msg.request_id)
            if pw is not None:
                reply, pw.reply = pw.reply, None
            else:
                kind, what = self.requests.pop(msg.request_id, (None, None))
                if kind == "CHECKPOINT":
                    what.answer(msg)  # repagent.py checkpoint waits for it
        if reply is not None:
            reply(0)

    def on_ATTACHED(self, conn: HubConnection, msg: p.Attached) -> None:
        """The volume has an id on this connection: its writes stream from now on."""
        with self.stream.lock:
            kind, vol = self.requests.pop(msg.request_id, (None, None))
            if kind != "ATTACH" or conn is not self.stream.conn:
                log.warning("ATTACHED for unknown request %d: answered ERROR(INVALID)",
                            msg.request_id)
                if conn is self.stream.conn:
                    self.stream.enqueue(conn, unasked(msg))
                return
            vol.volume_id = msg.volume
            vol.plan = msg.plan
            vol.refused = None
            self.stream.by_id[msg.volume] = vol
            if conn.attached_at is None:
                conn.attached_at = time.monotonic()
            log.info("volume %s attached as id %d, plan %s (dirty %d bytes)", vol.name,
                     msg.volume, msg.plan.name, vol.bitmap.dirty_bytes)
            if msg.plan in (p.SyncPlan.VERIFY, p.SyncPlan.FULL) and vol.meta["needs_verify"]:
                vol.meta["needs_verify"] = False    # the hub now owns the verify
                vol.save_meta()
            if msg.plan == p.SyncPlan.NONE and vol.bitmap.dirty_count:
                # Marked between ATTACH and ATTACHED: the hub must resync it.
                extents = vol.bitmap.extents()
                self.stream.enqueue(conn, p.DirtyMap(volume=msg.volume, extents=extents))
            if msg.plan == p.SyncPlan.DEMOTED:
                log.warning("volume %s was promoted at the recovery site; this side is "
                            "demoted: guest writes are tracked in the dirty bitmap, not "
                            "sent; bring it back with rephub.py failback%s", vol.name,
                            "" if self.cfg.accept_failback else
                            " (after restarting repagent.py protect with --accept-failback)")
            self.stream.maybe_undegrade()

    def on_PING(self, conn, msg):
        self.stream.answer(conn, p.Pong(request_id=msg.request_id, echo_ns=msg.sent_ns,
                                        responder_ns=time.time_ns()))

    def on_PONG(self, conn, msg):
        conn.rtt = (time.time_ns() - msg.echo_ns) / 1e9
        with self.stream.lock:
            self.requests.pop(msg.request_id, None)

    def on_ERROR(self, conn: HubConnection, msg: p.Error) -> None:
        """A refused write stays marked (and is reported); other errors are logged.

        ROLE for a write: the volume was promoted at the recovery site while
        attached here.  The connection is closed so that the next one attaches
        it again: DEMOTED where FAILBACK is granted, refused otherwise; either
        way its writes stop going to the hub and stay marked."""
        reply = promoted = None
        conn.heard(f"ERROR {msg.code_name()} {msg.message}".rstrip())
        with self.stream.lock:
            pw = self.stream.pending.pop(msg.request_id, None)
            if pw is not None:
                # The hub refused the write: it stays marked for a resync.
                pw.volume.bitmap.drop_inflight(pw.span, self.stream.seq)
                pw.volume.counters["refused_writes"] += 1
                if conn is self.stream.conn and pw.volume.volume_id is not None:
                    self.stream.report_dropped(conn, pw.volume, pw.span)
                reply, pw.reply = pw.reply, None
                self.stream.degrade(f"hub refused a write: {msg.code_name()}")
                # A hub whose storage failed refuses every later write of the
                # connection (PROTOCOL.md RP-10): one line tells it, not one per write.
                conn.refused_writes += 1
                log.log(logging.WARNING if conn.refused_writes == 1 else logging.DEBUG,
                        "hub refused %s write req=%d: %s %s%s", pw.volume.name,
                        msg.request_id, msg.code_name(), msg.message,
                        " (later refusals on this connection are logged at DEBUG; they stay "
                        "marked)" if conn.refused_writes == 1 else "")
                self.count_error("hub_error")
                if msg.code == p.ErrorCode.ROLE and conn is self.stream.conn:
                    promoted = pw.volume.name
            else:
                kind, what = self.requests.pop(msg.request_id, (None, None))
                if kind == "CHECKPOINT":
                    what.answer(msg)  # repagent.py checkpoint reports it
                if kind == "ATTACH":
                    what.refused = f"{msg.code_name()}: {msg.message}"
                    log.error("hub refused to attach volume %s: %s %s (writes stay "
                              "tracked; retried on the next connection)", what.name,
                              msg.code_name(), msg.message)
                else:
                    log.warning("hub error req=%d: %s %s", msg.request_id,
                                msg.code_name(), msg.message)
                self.count_error("hub_error")
        if reply is not None:
            reply(0)
        if promoted is not None:
            conn.close(f"volume {promoted} was promoted at the recovery site (ERROR ROLE): "
                       "re-attaching")

    def on_GOODBYE(self, conn, msg):
        log.info("hub says goodbye: %s", msg.reason)
        conn.heard(f"GOODBYE {msg.reason}".rstrip())
        conn.close(f"hub said goodbye: {msg.reason}")

    # -- the link's life (repagent-heartbeat thread) -----------------------------

    def connection_lost(self, conn: HubConnection, reason: str) -> None:
        """Any thread: every queued, unACKed write becomes dropped."""
        replies = []
        with self.stream.lock:
            if conn is not self.stream.conn:
                return
            self.stream.conn = None
            for pw in self.stream.pending.values():
                pw.volume.bitmap.drop_inflight(pw.span, self.stream.seq)
                if pw.reply is not None:
                    replies.append(pw.reply)
                    pw.reply = None
            self.stream.pending.clear()
            self.requests.clear()
            self.sync.forget()
            self.stream.by_id.clear()
            conn.queue.clear()
            conn.queued_bytes = 0
            for vol in self.volumes:
                vol.volume_id = None
                vol.held.clear()
                vol.dropped.clear()
                vol.drop_report = None
                vol.queued_frames = vol.queued_bytes = 0
                if vol.failback is not None:      # ends it like an ABORT
                    self.failbacks.cut_short(conn, vol, "the hub connection was lost")
            self.stream.degrade("hub connection lost")
            self.stream.timer_cond.notify_all()
        if not self.stopping.is_set():
            self.count_error("connection_lost")
        if conn.refused_writes > 1:
            log.warning("the hub refused %d writes on the connection that ended; they stay "
                        "marked and are resynced", conn.refused_writes)
        self.last_disconnect = {"reason": reason, "hub_said": conn.hub_said or None,
                                "at": time.time(),
                                "lived_s": round(time.monotonic() - conn.since, 3),
                                "attached": conn.attached_at is not None}
        self.set_link(LinkState.DISCONNECTED, reason,
                       logging.INFO if self.stopping.is_set() else logging.WARNING)
        for reply in replies:
            reply(0)

    def set_link(self, state: LinkState, cause: str, level: int) -> None:
        """Log a link state change once (not once per retry)."""
        kind = cause.split(":")[0]
        if state != self.link_state or kind != self.link_cause.split(":")[0]:
            log.log(level, "hub %s:%d %s%s", *self.cfg.hub, state.value,
                    f" ({cause})" if cause else "")
        self.link_state, self.link_cause = state, cause

    def _connect(self) -> HubConnection:
        """Connect, authenticate, queue an ATTACH per volume (heartbeat thread)."""
        sock, hub_id, features = connect_to_hub(self.cfg, AGENT_FEATURES)
        sock.settimeout(None)
        conn = HubConnection(self, sock, "%s:%d" % self.cfg.hub, hub_id, features)
        with self.stream.lock:
            self.stream.conn = conn
            for vol in self.volumes:
                req = self.stream.next_req()
                self.requests[req] = ("ATTACH", vol)
                state = vol.attach_state()
                log.info("--> ATTACH %s size=%d chunk=%d state=%s", vol.name, vol.size,
                         vol.bitmap.chunk_size, state.name)
                self.stream.enqueue(conn, p.Attach(
                    request_id=req, size=vol.size, chunk_size=vol.bitmap.chunk_size,
                    state=state, generation=vol.bitmap.generation, name=vol.name))
        # Before its threads start: a connection that ends at once must not
        # be logged (and shown) connected after its end.
        self.set_link(LinkState.CONNECTED, f"hub {conn.hub_id}", logging.INFO)
        conn.start()
        return conn

    def adopt(self, sock: socket.socket, attached: dict[Volume, int],
              features: p.Feature = p.Feature.NONE, start: bool = True) -> HubConnection:
        """Make ``sock``, a connection past AUTH_OK, the hub connection, with
        each volume of ``attached`` attached under its id as if ATTACHED (plan
        NONE) had come: the seam through which a test plays the hub from the
        established phase on, without a handshake (main thread, before
        ``Agent.start``; the heartbeat thread is not running)."""
        conn = HubConnection(self, sock, "test", "hub", features)
        with self.stream.lock:
            self.stream.conn = conn
            for vol, volume_id in attached.items():
                vol.volume_id, vol.plan = volume_id, p.SyncPlan.NONE
                self.stream.by_id[volume_id] = vol
            conn.attached_at = time.monotonic()
            self.stream.maybe_undegrade()
        if start:
            conn.start()
        return conn


    def _backoff(self, backoff: float) -> float:
        """Wait ``backoff`` seconds (with jitter, or until stopping); return the
        next, doubled, backoff.  Heartbeat thread."""
        delay = backoff * (0.8 + 0.4 * random.random())
        self.retry_at = time.monotonic() + delay
        self.stopping.wait(delay)
        self.retry_at = None
        return min(backoff * 2, self.cfg.max_backoff)

    def run(self) -> None:
        """repagent-heartbeat thread: the only one that (re)connects to the hub.

        The backoff doubles after every failed attempt and after every
        connection that ended before it was healthy (HEALTHY_CONNECTION): a
        hub that answers the handshake and then closes is retried as slowly
        as one that refuses the connection.  Only a healthy connection's end
        reconnects at once and resets the backoff."""
        least = backoff = min(BACKOFF_MIN, self.cfg.max_backoff)
        conn: HubConnection | None = None   # ours until it has ended, even if
        while not self.stopping.is_set():   # connection_lost forgot it already
            if conn is None:
                self.connect_attempts += 1
                try:
                    conn = self._connect()
                except (OSError, p.ReplicationError, HandshakeError, ValueError) as err:
                    self.set_link(LinkState.DISCONNECTED, f"{type(err).__name__}: {err}",
                                   logging.WARNING)
                    self.count_error("connect")
                    backoff = self._backoff(backoff)
                    continue
                continue
            now = time.monotonic()
            if now - conn.last_rx > self.cfg.hub_timeout:
                conn.close(f"hub silent for {now - conn.last_rx:.1f}s "
                           f"(--hub-timeout {self.cfg.hub_timeout}s)")
            elif now - conn.last_ping >= self.cfg.ping_interval:
                conn.last_ping = now
                with self.stream.lock:
                    if conn is self.stream.conn:
                        req = self.stream.next_req()
                        self.requests[req] = ("PING", None)
                        self.stream.enqueue(conn, p.Ping(request_id=req, sent_ns=time.time_ns()))
            if conn.ended.wait(min(0.5, self.cfg.ping_interval)):
                conn.join(1.0)
                if conn.healthy(time.monotonic()):
                    backoff = least
                elif not self.stopping.is_set():
                    log.info("hub connection ended %.1fs after the handshake, before a "
                             "volume stayed attached %.0fs: next attempt in about %.1fs",
                             time.monotonic() - conn.since, HEALTHY_CONNECTION, backoff)
                    backoff = self._backoff(backoff)
                conn = None


class Agent:
    """The composition root: builds the parts above, starts and stops them
    in order, and answers the control socket (repagent-control).

    ``stream`` is the ordered stream and its lock (``lock`` and ``conn`` are
    that lock and its attached connection); ``link`` the hub connection's
    life and the hub's frames; ``sync`` serves the hub's reads;
    ``failbacks`` a fail-back; ``qemu`` the mirror jobs.

    Threads::

        start, stop              main
        status, error_counts     repagent-control and repagent-metrics
        count_error              any thread
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stopping = threading.Event()
        self.volumes = [Volume(volume, node, cfg.state_dir) for node, volume in cfg.nodes]
        self.stream = Stream(cfg, self.volumes, self.stopping)
        self.sync = SyncServer(self.stream, self.stopping)
        self.qemu = QemuSide(cfg, self.volumes, self.stream, self.stopping, self.count_error)
        self.failbacks = FailbackWorker(cfg, self.stream, self.qemu, self.count_error)
        self.link = HubLink(cfg, self.volumes, self.stream, self.sync, self.failbacks,
                            self.stopping, self.count_error)
        self.threads: list[threading.Thread] = []
        self.control: socket.socket | None = None
        self.lockfile = None
        self.metrics: MetricsServer | None = None   # set by cmd_protect
        self.error_lock = threading.Lock()
        self.errors: collections.Counter[str] = collections.Counter()  # kind -> WARNINGs

    @property
    def lock(self) -> threading.Lock:
        """The stream's lock (any thread)."""
        return self.stream.lock

    @property
    def conn(self) -> HubConnection | None:
        """The attached hub connection, if any (read it with ``lock`` held)."""
        return self.stream.conn

    @conn.setter
    def conn(self, conn: HubConnection | None) -> None:
        self.stream.conn = conn

    def count_error(self, kind: str) -> None:
        """Count a fault logged at WARNING, for status and /metrics.  Any thread."""
        with self.error_lock:
            self.errors[kind] += 1

    # -- start and stop (main thread) ----------------------------------------------

    def _make_source(self, vol: Volume, node_info: dict):
        if vol.node in self.cfg.sources:
            address, export = self.cfg.sources[vol.node]
            return lambda: NBDSource(address, export)
        path = raw_image_file(node_info)
        if path is None:
            raise ValueError(f"node {vol.node!r} is {node_info.get('drv')!r}, not a raw file: "
                             f"give --source {vol.node}=nbd+unix:///EXPORT?socket=PATH "
                             "(QSD's NBD export of it)")
        return lambda: FileSource(path)

    def start(self) -> None:
        private_dir(self.cfg.state_dir, "state dir")
        self.lockfile = open_lockfile(self.cfg.state_dir)
        try:
            fcntl.flock(self.lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"repagent: another agent runs on state dir "
                             f"{self.cfg.state_dir}") from None
        qmp = self.qemu.connect()
        for vol in self.volumes:
            info = find_node(qmp, vol.node)
            vol.source = self._make_source(vol, info)
            vol.open_bitmap(info["image"]["virtual-size"], self.cfg.chunk_size,
                            self.cfg.fsync_bitmap)
            log.info("volume %s: node %s, %d bytes, %d chunks of %d, %d dirty, generation %s",
                     vol.name, vol.node, vol.size, vol.bitmap.chunks, self.cfg.chunk_size,
                     vol.bitmap.dirty_count, vol.bitmap.generation.hex())
            vol.server = nbd.NBDServer(vol.target_socket, vol.name, vol.size,
                                       TargetHandler(self.stream, vol),
                                       socket_mode=PRIVATE_FILE)
            vol.server.start()
            if delete_export(qmp, failback_export(vol.name)):
                log.warning("volume %s: removed export %s left by an interrupted fail-back",
                            vol.name, failback_export(vol.name))
            outcome = self.qemu.set_up_mirror(vol)
            if outcome == JobSetup.RESUMED and vol.bitmap.created \
                    and not vol.meta["needs_verify"]:
                # Our job ran before this bitmap existed: the marks of the
                # writes it had sent us, not ACKed yet, went with the old one.
                log.warning("volume %s: mirror job %s is older than the bitmap %s (state "
                            "dir lost or replaced): the hub will verify", vol.name,
                            vol.meta["job_id"], vol.bitmap_path)
                vol.meta["needs_verify"] = True
                vol.save_meta()
        self._start_control()
        specs = [("repagent-heartbeat", self.link.run),
                 ("repagent-timer", self.stream.timer_loop),
                 ("repagent-jobs", self.qemu.run),
                 ("repagent-control", self._control_loop),
                 ("repagent-failback", self.failbacks.run)] + self.sync.threads()
        for name, target in specs:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        """SIGTERM: stop taking writes, drain to the hub (bounded), keep the job resumable."""
        log.info("stopping: no new writes, draining the queue for at most %.1fs",
                 self.cfg.drain_timeout)
        # A fail-back in progress is undone first: the mirror needs our NBD target.
        for vol in self.volumes:
            if vol.failback is not None:
                self.failbacks.cut_short(vol.failback.conn, vol, "the agent is stopping")
        self.failbacks.stop()
        for t in self.threads:
            if t.name == "repagent-failback":
                t.join(FAILBACK_STOP_TIMEOUT)
        if self.cfg.unprotect_on_exit and self.qemu.qmp is not None:
            self.qemu.unprotect()
        for vol in self.volumes:
            if vol.server is not None:
                vol.server.stop()
        deadline = time.monotonic() + self.cfg.drain_timeout
        while time.monotonic() < deadline:
            with self.lock:
                busy = self.conn is not None and (self.stream.pending or self.conn.queue)
            if not busy:
                break
            self.stopping.wait(0.05)  # the recv thread clears pending; nothing to wait on
        with self.lock:
            left = len(self.stream.pending)
        if left:
            log.warning("stopping with %d writes not ACKed: they stay marked in the bitmap",
                        left)
        self.stopping.set()
        conn = self.conn
        if conn is not None:
            try:
                conn.send_direct(p.Goodbye.for_features(conn.features, "agent stopping",
                                                        p.GoodbyeCode.SHUTDOWN))
            except OSError:
                pass
            conn.close("agent stopping")
            conn.join(2.0)
        with self.lock:
            self.stream.timer_cond.notify_all()
        for t in self.threads:
            t.join(2.0)
            if t.is_alive():
                log.warning("thread %s did not stop within 2s", t.name)
        if self.metrics is not None:
            self.metrics.close()
        if self.control is not None:
            self.control.close()
            try:
                os.unlink(self.control_path)
            except OSError:
                pass
        for vol in self.volumes:
            if vol.bitmap is not None:
                vol.bitmap.close()
        self.qemu.close()
        self.link.set_link(LinkState.STOPPED, "", logging.INFO)

    # -- status (repagent-control thread) ------------------------------------------

    @property
    def control_path(self) -> str:
        return os.path.join(self.cfg.state_dir, "control.sock")

    def _start_control(self) -> None:
        path = check_unix_path(self.control_path, "control socket")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listen_private_unix(self.control, path, 4)
        self.control.settimeout(0.5)

    def _control_loop(self) -> None:
        """repagent-control thread: accept on ``control.sock`` (``accept_forever``:
        it never dies and never spins) and answer each request in this thread."""
        accept_forever(self.control, self.stopping, self._answer_control, LogThrottle(log),
                       "control request")

    def _answer_control(self, client: socket.socket, _) -> bool:
        """One JSON document per request: the status, or a checkpoint's result."""
        with client:
            try:
                client.settimeout(CONTROL_TIMEOUT)
                request = client.recv(512).strip()
                if request == b"status":
                    client.sendall(json.dumps(self.status()).encode() + b"\n")
                elif request.startswith(b"checkpoint "):  # repagent.py checkpoint
                    client.sendall(json.dumps(agent_checkpoint(
                        self, request[11:].decode(errors="replace"))).encode() + b"\n")
                else:
                    client.sendall(json.dumps(
                        {"error": f"unknown request {request[:32]!r}, "
                                  "expected 'status'"}).encode() + b"\n")
            except OSError as err:
                log.debug("control client: %s", err)
        return True

    def status(self) -> dict:
        with self.lock:
            conn = self.conn
            now = time.monotonic()
            common = {
                "mode": self.cfg.mode + (" (degraded)" if self.stream.degraded and
                                         self.cfg.mode == "sync" else ""),
                "connection": self.link.link_state.value if conn is None else "connected",
                "last_ack_age_s": (round(now - self.stream.last_ack, 3)
                                   if self.stream.last_ack else None),
            }
            volumes = []
            for vol in self.volumes:
                volumes.append({
                    "volume": vol.name, "node": vol.node, "size": vol.size,
                    "chunk_size": vol.bitmap.chunk_size, **common,
                    "attached": vol.volume_id is not None, "volume_id": vol.volume_id,
                    "refused": vol.refused,
                    "plan": vol.plan.name if vol.plan is not None else None,
                    "role": vol.role,
                    "failback": None if vol.failback is None else {
                        "export": vol.failback.export, "puts": vol.failback.puts,
                        "put_bytes": vol.failback.put_bytes,
                        "started": vol.failback.started},
                    "dirty_bytes": vol.bitmap.dirty_bytes,
                    "dirty_block_bytes": vol.bitmap.dirty_block_bytes,
                    "dirty_chunks": vol.bitmap.dirty_count,
                    "lost_chunks": vol.bitmap.lost_chunks,
                    "inflight_chunks": vol.bitmap.inflight_chunks,
                    "queue_frames": vol.queued_frames, "queue_bytes": vol.queued_bytes,
                    "held_writes": len(vol.held),
                    "job": vol.job_status, "job_id": vol.meta["job_id"],
                    # What QEMU itself still has to copy into us (after a target
                    # outage the job re-copies the regions it kept dirty).
                    "job_remaining_bytes": max(0, vol.job_info.get("len", 0)
                                               - vol.job_info.get("offset", 0)),
                    "job_paused": bool(vol.job_info.get("paused")),
                    "job_io_status": vol.job_info.get("io-status"),
                    "generation": vol.bitmap.generation.hex(),
                    "needs_verify": vol.meta["needs_verify"],
                    # What the next ATTACH will say (UNKNOWN: the hub verifies).
                    "attach_state": vol.attach_state().name,
                    "bypass_writers": vol.bypass_writers,
                    "counters": dict(vol.counters)})
            return {
                "agent_id": self.cfg.agent_id, "hub": "%s:%d" % self.cfg.hub,
                "pid": os.getpid(), **common, "degraded": self.stream.degraded,
                "link_cause": self.link.link_cause, "connect_attempts": self.link.connect_attempts,
                # Why the last connection ended, with the hub's own words (its
                # last ERROR or GOODBYE) when it gave any.
                "last_disconnect": self.link.last_disconnect,
                "retry_in_s": (None if self.link.retry_at is None
                               else round(max(0.0, self.link.retry_at - now), 3)),
                "connected_since": conn.connected_at if conn else None,
                "rtt_s": conn.rtt if conn else None,
                "pending_writes": len(self.stream.pending),
                "queue_frames": len(conn.queue) if conn else 0,
                "queue_bytes": conn.queued_bytes if conn else 0,
                "stream_seq": self.stream.seq, "errors": self.error_counts(),
                "volumes": volumes}

    def error_counts(self) -> dict[str, int]:
        with self.error_lock:
            return dict(self.errors)


# ---------------------------------------------------------------------------
# Metrics: ``protect --metrics-listen HOST:PORT`` (Prometheus text format 0.0.4)
#
# Built from ``Agent.status``, the document ``repagent.py status`` shows, so
# the two never disagree.  Counters count since the agent started.  rephub.py
# has the same small text writer and server: each daemon stays one file.

#: The kinds ``Agent.count_error`` counts, each at a WARNING of the same cause;
#: every one is exported, 0 until it happens, so alerts have a series to watch.
AGENT_ERROR_KINDS = ("connect", "connection_lost", "protocol", "bad_frame", "hub_error", "qmp",
                     "failback")


def agent_metrics(st: dict) -> str:
    """The agent's status document (``Agent.status``) as Prometheus text."""
    vols = st["volumes"]
    errors = dict.fromkeys(AGENT_ERROR_KINDS, 0) | st.get("errors", {})

    def per_volume(key):
        return [({"volume": v["volume"]}, v[key]) for v in vols]
    return prometheus_text([
        ("repagent_connection_up", "gauge", "1 while the hub connection is established.",
         [({"hub": st["hub"]}, st["connection"] == LinkState.CONNECTED.value)]),
        ("repagent_degraded", "gauge", "1 while sync mode answers writes before the hub's "
         "ACK (always 0 in async mode).", [({}, st["degraded"])]),
        ("repagent_last_ack_age_seconds", "gauge", "Time since the hub's last ACK.",
         [({}, st["last_ack_age_s"])]),
        ("repagent_hub_rtt_seconds", "gauge", "Round trip of the last PING to the hub.",
         [({}, st["rtt_s"])]),
        ("repagent_pending_writes", "gauge", "Writes sent or queued, not yet ACKed.",
         [({}, st["pending_writes"])]),
        ("repagent_queue_bytes", "gauge", "Data bytes queued for the hub.",
         per_volume("queue_bytes")),
        ("repagent_queue_frames", "gauge", "Frames queued for the hub.",
         per_volume("queue_frames")),
        ("repagent_dirty_bytes", "gauge", "Bytes of the chunks marked in the dirty bitmap.",
         per_volume("dirty_bytes")),
        ("repagent_volume_attached", "gauge", "1 while the hub has the volume attached.",
         per_volume("attached")),
        ("repagent_volume_size_bytes", "gauge", "Volume size.", per_volume("size")),
        ("repagent_volume_demoted", "gauge", "1 while the volume is promoted at the recovery "
         "site (writes only marked) or failing back.",
         [({"volume": v["volume"]}, v.get("role", "protected") != "protected") for v in vols]),
        ("repagent_failback_put_bytes_total", "counter", "Bytes the hub wrote into the volume "
         "with PUT during fail-backs.",
         [({"volume": v["volume"]}, v["counters"].get("put_bytes", 0)) for v in vols]),
        ("repagent_sent_bytes_total", "counter", "Data bytes put on the hub stream: guest "
         "writes (kind=write) and replies to the hub's sync reads (kind=sync).",
         [({"volume": v["volume"], "kind": kind}, v["counters"].get(key, 0))
          for v in vols for kind, key in (("write", "sent_bytes"),
                                          ("sync", "read_reply_bytes"))]),
        ("repagent_dropped_writes_total", "counter", "Writes only marked (queue full or no "
         "connection): the hub resyncs them.",
         [({"volume": v["volume"]}, v["counters"].get("dropped_writes", 0)
           + v["counters"].get("untracked_writes", 0)) for v in vols]),
        ("repagent_errors_total", "counter", "Faults logged at WARNING, by kind.",
         [({"kind": k}, n) for k, n in sorted(errors.items())]),
    ])


# ---------------------------------------------------------------------------
# Recovery mode: ``repagent.py recover`` (PROTOCOL.md "Recovery (remote IO)")
#
# On the recovery site the agent serves an NBD export that a recovery VM (or
# QSD, or qemu-io) opens.  Each NBD request is forwarded at once as RREAD /
# RWRITE / RFLUSH over one authenticated hub connection and answered only
# when the hub answers: requests are pipelined and matched to answers by
# request id, nothing is cached here, so the VM sees exactly what the hub
# holds (the volume at the point plus the session's own writes).  SIGTERM
# ends the session with RECOVER_CLOSE.  ``repagent.py checkpoint`` (further
# down) asks a running protect agent to put a CHECKPOINT on its stream.

RECOVER_OPEN_TIMEOUT = 300.0
"""A FAILOVER open rolls the replica back first: that may take a while."""

RECOVER_CLOSE_TIMEOUT = 30.0
"""On SIGTERM, how long to wait for the hub's ACK of RECOVER_CLOSE."""

READ_AHEAD_DEPTH = 2
"""A recovery export that sees sequential reads asks the hub for this many
reads of the same length ahead of the one asked, so that the hub reads and
sums the next while the agent and the client handle this one."""

READ_AHEAD_MAX = 4 * 1024 * 1024
"""... for reads of at most this length."""

CHECKPOINT_TIMEOUT = 30.0
"""How long ``repagent.py checkpoint`` waits for the hub's ACK."""


class RecoveryError(Exception):
    """The recovery session could not be opened, or its connection was lost."""


@dataclasses.dataclass
class RecoveryConfig:
    hub: tuple[str, int]
    agent_id: str
    secret: bytes
    hub_timeout: float = DEFAULT_HUB_TIMEOUT
    tls_ca: str | None = None


#: What a recovery connection offers: only GOODBYE's code, which tells a
#: fail-back ending the session from any other end.
RECOVERY_FEATURES = p.Feature.GOODBYE_CODE

#: What a hub sends on an established recovery connection and the session
#: acts on.  The hub's volume requests find no volume attached
#: (RECOVERY_NO_VOLUME: ERROR(NO_SUCH_VOLUME), [VO-6]); its stray answers are
#: logged; every other known type, HELLO_REPLY and AUTH_OK included, is in
#: the wrong direction or phase: ERROR(UNSUPPORTED) ([ER-5]).
RECOVERY_RECEIVES = frozenset({
    p.MsgType.RECOVER_READY, p.MsgType.RREAD_REPLY, p.MsgType.ACK, p.MsgType.PING,
    p.MsgType.PONG, p.MsgType.ERROR, p.MsgType.GOODBYE})
RECOVERY_NO_VOLUME = frozenset(p.VOLUME_RULES[p.Side.AGENT])   # each volume is in phase NONE
#: The hub's answers to the recovery client's requests.
ANSWER_TYPES = frozenset({p.MsgType.RECOVER_READY, p.MsgType.RREAD_REPLY, p.MsgType.ACK,
                          p.MsgType.ERROR})


class RecoveryClient:
    """One hub connection carrying one recovery session.

    Threads: ``repagent-recover-recv`` alone reads the socket (answers, PINGs);
    the nbd-conn threads call ``request``; every send holds ``send_lock``.

    Threads::

        open, close          main
        request              nbd-conn-VOLUME-N (the recovery export)
        *                    repagent-recover-recv
    """

    def __init__(self, cfg: RecoveryConfig, volume: str, point: str, mode: p.RecoverMode):
        self.cfg = cfg            # what connect_to_hub needs
        self.volume, self.point, self.mode = volume, point, mode
        self.sock: socket.socket | None = None
        self.session = 0
        self.size = 0
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.pending: dict[int, tuple[str, Callable, int]] = {}  # req -> (type, reply, length)
        self._req = 0
        self.lost = threading.Event()
        self.lost_cause = ""
        self.failed_back = False   # the hub ended the session: the volume went home
        self.goodbye_sent = False  # the agent said GOODBYE: it sends nothing more
        self.features = p.Feature.NONE  # granted in HELLO_REPLY
        self.opening = 0           # request id of the RECOVER_OPEN awaiting its answer
        self.closed = threading.Event()
        self.thread: threading.Thread | None = None

    def open(self) -> p.RecoverReady:
        """Connect, authenticate, RECOVER_OPEN; start the recv thread (caller's thread).

        Until RECOVER_READY or ERROR answers the open, every other frame is
        answered as in the session proper (``_next_frame``): PING gets PONG,
        an unknown type or a bad request gets ERROR and the wait goes on
        (FR-16, ER-2, ER-5)."""
        # The same HELLO/AUTH as protect mode; GOODBYE_CODE says why the hub ends it.
        sock, hub_id, self.features = connect_to_hub(self.cfg, RECOVERY_FEATURES)
        self.sock = sock
        try:
            sock.settimeout(RECOVER_OPEN_TIMEOUT)
            req = self.opening = self._next_req()
            log.info("--> RECOVER_OPEN %s %s at %r", self.mode.name, self.volume, self.point)
            p.send_message(sock, p.RecoverOpen(request_id=req, mode=self.mode,
                                               name=self.volume, point=self.point))
            while True:
                reply = self._next_frame()
                if reply is None:
                    raise RecoveryError("the hub closed the connection before RECOVER_READY")
                if isinstance(reply, (p.Error, p.RecoverReady)) and reply.request_id == req:
                    break
                if isinstance(reply, p.Goodbye):
                    raise RecoveryError(f"hub {hub_id} said goodbye before RECOVER_READY: "
                                        f"{reply.describe()}")
                if isinstance(reply, p.Ping):  # the hub's heartbeat may come first
                    self.on_PING(reply)
                elif not isinstance(reply, p.Pong):
                    log.warning("hub sent %s before RECOVER_READY; ignored", reply.describe())
            if isinstance(reply, p.Error):
                raise RecoveryError(f"hub {hub_id} refused RECOVER_OPEN {self.mode.name} of "
                                    f"{self.volume} at {self.point!r}: {reply.code_name()} "
                                    f"{reply.message}")
            sock.settimeout(None)
            self.opening = 0
        except BaseException:
            self.sock = None
            sock.close()
            raise
        self.session, self.size = reply.volume, reply.size
        log.info("<-- RECOVER_READY session=%d size=%d point time %s", reply.volume,
                 reply.size, time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                           time.gmtime(reply.point_time_ns / 1e9)))
        self.thread = threading.Thread(target=self._recv_loop, name="repagent-recover-recv",
                                       daemon=True)
        self.thread.start()
        return reply

    def _next_req(self) -> int:
        self._req = self._req % ((1 << 64) - 1) + 1
        return self._req

    def request(self, make: Callable[[int], p.Message], reply: Callable, length: int = 0) -> None:
        """Send one request; ``reply`` is called from the recv thread with the
        hub's answer (nbd-conn threads).  A lost link answers EIO at once."""
        with self.lock:
            if self.lost.is_set():
                reply(errno.EIO)
                return
            req = self._next_req()
            msg = make(req)
            self.pending[req] = (msg.TYPE.name, reply, length)
        try:
            self._send(msg)
        except OSError as err:
            self._lose(f"send failed: {err}")

    def _send(self, msg: p.Message) -> None:
        """Send one frame under ``send_lock`` (any thread); nothing once
        GOODBYE is sent (LV-2)."""
        with self.send_lock:
            if self.goodbye_sent:
                return
            if log.isEnabledFor(logging.DEBUG):
                log.debug("--> %s", msg.describe())
            p.send_message(self.sock, msg)
            self.goodbye_sent = isinstance(msg, p.Goodbye)

    def _next_frame(self) -> p.Message | None:
        """The next frame a recovery connection acts on; None at end of stream.

        Frames that fail as requests are answered here and skipped, as in
        protect mode: an unknown type, an undefined flag, a non-zero unused
        field or a malformed payload gets ERROR with the frame's request id
        and type (FR-16, FR-13, FR-7, ER-2; never for the types ER-3 lists),
        a type the agent never takes (the wrong direction, a feature not
        granted) ERROR(UNSUPPORTED) before anything else in it is looked at
        (ER-5, VN-6), a known type a hub does not send on a recovery connection
        ERROR(UNSUPPORTED) too, a volume request ERROR(NO_SUCH_VOLUME) (VO-6)
        and an ATTACHED ERROR(INVALID) (ER-7).  A ProtocolError (framing lost,
        a request id 0) propagates: the caller closes."""
        legal = p.legality(p.Side.AGENT, self.features)
        while True:
            try:
                msg = p.recv_message(self.sock, legal=legal)
            except p.RequestError as err:
                log.warning("hub sent a bad frame: %s", err)
                if p.may_answer_with_error(err):
                    self._send(p.Error.from_exception(err))
                self._answer_unreadable(err)
                continue
            if msg is None:
                return None
            if log.isEnabledFor(logging.DEBUG):
                log.debug("<-- %s", msg.describe())
            if msg.TYPE in RECOVERY_RECEIVES:
                return msg
            if msg.TYPE is p.MsgType.SYNCED:   # never answered (ER-3)
                log.warning("hub sent %s on a recovery connection; ignored", msg.describe())
                continue
            if msg.TYPE is p.MsgType.ATTACHED:   # no ATTACH is ever sent here (ER-7)
                log.warning("hub sent %s on a recovery connection; answered ERROR(INVALID)",
                            msg.describe())
                self._send(unasked(msg))
                continue
            if msg.TYPE in RECOVERY_NO_VOLUME:
                code, text = (p.ErrorCode.NO_SUCH_VOLUME,
                              f"no volume is attached on a recovery connection "
                              f"(volume id {msg.volume})")
            else:
                code, text = (p.ErrorCode.UNSUPPORTED,
                              f"recovery agent does not accept {msg.TYPE.name}")
            log.warning("hub sent %s; answered ERROR(%s)", msg.TYPE.name, code.name)
            self._send(p.Error(request_id=msg.request_id, code=code, failed_type=msg.TYPE,
                               message=text))

    def _answer_unreadable(self, err: p.RequestError) -> None:
        """A malformed answer to one of our requests: that request failed (EIO,
        or the open fails) rather than wait for an answer that was lost."""
        if err.msg_type not in ANSWER_TYPES or not err.request_id:
            return
        if err.request_id == self.opening:
            raise RecoveryError(f"the hub's answer to RECOVER_OPEN is malformed: {err}")
        item = self._answer(err.request_id)
        if item is not None:
            item[1](errno.EIO)

    def _recv_loop(self) -> None:
        """repagent-recover-recv thread: dispatch each hub message to ``on_<TYPE>``."""
        try:
            while True:
                msg = self._next_frame()
                if msg is None:
                    self._lose("the hub closed the connection")
                    return
                getattr(self, f"on_{msg.TYPE.name}")(msg)
        except p.ProtocolError as err:
            log.warning("hub broke the protocol: %s", err)
            try:
                self._send(p.Error(code=p.ErrorCode.PROTOCOL, message=str(err)))
            except OSError:
                pass
            self._lose(f"protocol error: {err}")
        except OSError as err:
            self._lose(f"hub connection failed: {err}")

    def _answer(self, req: int):
        with self.lock:
            return self.pending.pop(req, None)

    def on_RREAD_REPLY(self, msg: p.RReadReply) -> None:
        item = self._answer(msg.request_id)
        if item is None:   # answers no RREAD of ours (ER-7)
            log.warning("unexpected %s: answered ERROR(INVALID)", msg.describe())
            self._send(unasked(msg))
            return
        item[1](0, bytes(item[2]) if msg.is_zero else msg.data)

    def on_ACK(self, msg: p.Ack) -> None:
        item = self._answer(msg.request_id)
        if item is not None:
            item[1](0)

    def on_ERROR(self, msg: p.Error) -> None:
        item = self._answer(msg.request_id)
        log.warning("hub error for %s req=%d: %s %s%s",
                    item[0] if item else "request", msg.request_id, msg.code_name(),
                    msg.message, "; answered EIO" if item else "")
        if item is not None:
            item[1](errno.EIO)

    def on_PING(self, msg: p.Ping) -> None:
        self._send(p.Pong(request_id=msg.request_id, echo_ns=msg.sent_ns,
                          responder_ns=time.time_ns()))

    def on_RECOVER_READY(self, msg: p.RecoverReady) -> None:
        """A second RECOVER_READY answers no open of this connection (ER-7): the
        session keeps its id, and the hub hears that the answer was not asked."""
        log.warning("unexpected %s: answered ERROR(INVALID)", msg.describe())
        self._send(unasked(msg))

    def on_PONG(self, msg: p.Pong) -> None:
        pass

    def on_GOODBYE(self, msg: p.Goodbye) -> None:
        """The hub ends the connection; a fail-back that succeeded says so with
        code FAILED_BACK (PROTOCOL.md [FB-12], [LV-5]), never in the text."""
        self.failed_back = msg.reason_code() == p.GoodbyeCode.FAILED_BACK
        self._lose(f"hub said goodbye ({msg.reason_code().name}): {msg.reason}")

    def _lose(self, cause: str) -> None:
        """The link is gone: every outstanding request fails with EIO (LV-3)."""
        with self.lock:
            if self.lost.is_set():
                return
            self.lost_cause = cause
            self.lost.set()
            failed, self.pending = list(self.pending.values()), {}
        if self.failed_back:
            log.info("recovery session %d of %s ended by the hub: %s", self.session,
                     self.volume, cause)
        elif not self.closed.is_set():
            log.error("recovery session %d of %s lost: %s (%d requests answered EIO)",
                      self.session, self.volume, cause, len(failed))
        for _, reply, _ in failed:
            reply(errno.EIO)

    def _say_goodbye(self) -> None:
        """End an orderly close with GOODBYE (shutdown) while the link is up:
        the agent sends nothing after it (LV-2).  A hub that already ended the
        connection, or a lost link, gets none."""
        with self.lock:
            if self.lost.is_set():
                return
            self.lost_cause = "agent closed the connection"
            self.lost.set()        # from here on request() answers EIO, sends nothing
        try:
            self._send(p.Goodbye.for_features(self.features, "recovery session closed",
                                              p.GoodbyeCode.SHUTDOWN))
        except OSError as err:
            log.debug("GOODBYE not sent: %s", err)

    def close(self) -> bool:
        """RECOVER_CLOSE, wait for its ACK (bounded), GOODBYE, close (main thread)."""
        ok = self.failed_back         # then the hub has closed the session itself
        if not ok:
            done = threading.Event()
            result = []
            self.request(lambda req: p.RecoverClose(request_id=req, volume=self.session),
                         lambda err, data=None: (result.append(err), done.set()))
            ok = done.wait(RECOVER_CLOSE_TIMEOUT) and result == [0]
            if ok:
                log.info("recovery session %d of %s closed", self.session, self.volume)
            else:
                log.warning("RECOVER_CLOSE of session %d not acknowledged (%s); the hub ends "
                            "the session when the connection closes", self.session,
                            self.lost_cause or "timeout")
        self.closed.set()
        self._say_goodbye()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.thread is not None:
            self.thread.join(timeout=5)
        return ok


class ReadAhead:
    """One RREAD the recovery export sent before the client asked for it: its
    answer once it came (``done``: ``error``, ``data``), and the client reads
    that asked for it meanwhile (``waiters``).

    Threads::

        *                    any thread, with RecoveryHandler.lock held
    """

    def __init__(self, offset: int, length: int):
        self.offset, self.length = offset, length
        self.done = False
        self.error = 0
        self.data = None
        self.waiters: list[Callable] = []

    def overlaps(self, offset: int, length: int) -> bool:
        return offset < self.offset + self.length and self.offset < offset + length


class RecoveryHandler(nbd.Handler):
    """The recovery export: each NBD request becomes one hub request (nbd-conn threads).

    Sequential reads are read ahead (READ_AHEAD_DEPTH reads of their length,
    when at most READ_AHEAD_MAX): at QD1 the hub then reads and sums the
    next piece while this one travels to the client.  A read ahead answers
    a client read only if it reflects every write answered before that read
    came: none is sent while a write is in flight, and a write drops, when
    it comes, the reads ahead it overlaps (a read already waiting for one of
    them came before the write, so either answer is right).  A read ahead
    that failed is asked again for the client, as if it had never been sent.
    ``lock`` guards ``ahead``, ``next_offset`` and ``writes``; the hub's
    answers take it on repagent-recover-recv, and no hub request is sent
    while it is held.

    Threads::

        read, write, write_zeroes, flush    nbd-conn-VOLUME-N (the recovery export)
    """

    def __init__(self, client: RecoveryClient):
        self.client = client
        self.lock = threading.Lock()
        self.ahead: dict[int, ReadAhead] = {}    # offset -> read ahead, not yet taken
        self.next_offset = -1                    # where the last read ended
        self.writes = 0                          # writes not yet answered

    def read(self, offset, length, reply):
        with self.lock:
            hit = self.ahead.pop(offset, None)
            if hit is not None and (hit.length != length or (hit.done and hit.error)):
                hit = None
            if hit is not None and not hit.done:
                hit.waiters.append(reply)
            sequential = offset == self.next_offset
            self.next_offset = offset + length
            # Keep only what the next reads of this run can take.
            self.ahead = {o: a for o, a in self.ahead.items()
                          if offset < o <= offset + READ_AHEAD_DEPTH * length}
            new = []
            if sequential and length <= READ_AHEAD_MAX and not self.writes:
                for k in range(1, READ_AHEAD_DEPTH + 1):
                    o = offset + k * length
                    if o + length > self.client.size:
                        break
                    if o not in self.ahead:
                        new.append(self.ahead.setdefault(o, ReadAhead(o, length)))
        if hit is None:
            self._rread(offset, length, reply)
        elif hit.done:
            reply(0, hit.data)
        for ahead in new:
            self._rread(ahead.offset, ahead.length,
                        lambda err, data=None, ahead=ahead: self._answered(ahead, err, data))

    def _rread(self, offset: int, length: int, reply: Callable) -> None:
        sid = self.client.session
        self.client.request(lambda req: p.RRead(request_id=req, volume=sid, offset=offset,
                                                length=length), reply, length)

    def _answered(self, ahead: ReadAhead, err: int, data=None) -> None:
        """The hub answered a read ahead: the client reads waiting for it get
        its data, or (it failed) a read of their own."""
        with self.lock:
            ahead.done, ahead.error, ahead.data = True, err, data
            waiters, ahead.waiters = ahead.waiters, []
        for reply in waiters:
            if err:
                self._rread(ahead.offset, ahead.length, reply)
            else:
                reply(0, data)

    def _write_begins(self, offset: int, length: int, reply: Callable) -> Callable:
        """A write comes: drop the reads ahead it overlaps; returns its ``reply``
        wrapped to count it out of ``writes`` when answered."""
        with self.lock:
            self.writes += 1
            self.ahead = {o: a for o, a in self.ahead.items() if not a.overlaps(offset, length)}

        def done(err, data=None):
            with self.lock:
                self.writes -= 1
            reply(err)
        return done

    def write(self, offset, data, reply):
        sid = self.client.session
        reply = self._write_begins(offset, len(data), reply)
        self.client.request(lambda req: p.RWrite(request_id=req, volume=sid, offset=offset,
                                                 length=len(data), data=data), reply)

    def write_zeroes(self, offset, length, reply):
        # An NBD zero may exceed MAX_DATA: one RWRITE per piece, one answer at the end.
        sid = self.client.session
        reply = self._write_begins(offset, length, reply)
        pieces = [(o, min(p.MAX_DATA, offset + length - o))
                  for o in range(offset, offset + length, p.MAX_DATA)]
        state = {"left": len(pieces), "error": 0}
        lock = threading.Lock()

        def piece_done(err, data=None):
            with lock:
                state["error"] = state["error"] or err
                state["left"] -= 1
                last = state["left"] == 0
            if last:
                reply(state["error"])
        for o, n in pieces:
            self.client.request(lambda req, o=o, n=n: p.RWrite(
                request_id=req, volume=sid, offset=o, length=n, flags=p.FLAG_ZERO), piece_done)

    def flush(self, reply):
        sid = self.client.session
        self.client.request(lambda req: p.RFlush(request_id=req, volume=sid), reply)


def parse_listen(text: str):
    """``unix:PATH`` -> PATH; ``HOST:PORT`` -> (HOST, PORT)."""
    if text.startswith("unix:"):
        return check_unix_path(os.path.abspath(text[5:]), "--listen socket")
    try:
        return parse_host_port(text)
    except argparse.ArgumentTypeError:
        raise ValueError(f"--listen {text!r}: expected unix:PATH or HOST:PORT") from None


def export_uri(address, export: str) -> str:
    if isinstance(address, str):
        return f"nbd+unix:///{urllib.parse.quote(export)}?socket={address}"
    host, port = address[:2]
    return f"nbd://{host}:{port}/{urllib.parse.quote(export)}"


def cmd_recover(args) -> int:
    """Serve VOLUME at POINT from the hub as an NBD export until SIGTERM."""
    try:
        secret = read_secret_file(args.secret_file)
        p.validate_name(args.agent_id, "agent id")
        p.validate_name(args.volume, "volume name")
        listen = parse_listen(args.listen)
    except (OSError, ValueError, p.ReplicationError) as err:
        print(f"repagent.py: {err}", file=sys.stderr)
        return 2
    mode = p.RecoverMode.FAILOVER if args.failover else p.RecoverMode.TEST
    client = RecoveryClient(RecoveryConfig(hub=args.hub, agent_id=args.agent_id, secret=secret,
                                           hub_timeout=args.hub_timeout, tls_ca=args.tls_ca),
                            args.volume, args.at, mode)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        ready = client.open()
    except (OSError, HandshakeError, RecoveryError, p.ReplicationError) as err:
        log.error("cannot open the recovery session: %s", err)
        return 1
    if isinstance(listen, str) and os.path.exists(listen):
        os.unlink(listen)
    # A unix socket only its owner connects to (the recovery VM's).
    server = nbd.NBDServer(listen, args.volume, ready.size, RecoveryHandler(client),
                           socket_mode=PRIVATE_FILE)
    try:
        server.start()
    except OSError as err:
        log.error("cannot listen on %s: %s", args.listen, err)
        client.close()
        return 1
    uri = export_uri(server.address if not isinstance(listen, str) else listen, args.volume)
    log.info("%s of %s at %r served as %s", mode.name, args.volume, args.at, uri)
    print_line(uri)
    rc = 0
    while not stop.wait(0.5):
        if client.lost.is_set() and client.failed_back:
            log.info("volume %s failed back to its original site: this recovery export "
                     "ends (%s)", args.volume, client.lost_cause)
            break
        if client.lost.is_set():
            log.error("hub connection lost (%s); stopping the export", client.lost_cause)
            rc = 1
            break
    server.stop()
    client.close()
    if isinstance(listen, str):
        try:
            os.unlink(listen)
        except OSError:
            pass
    return rc


class CheckpointWaiter:
    """A CHECKPOINT sent through the running protect agent, until the hub answers.

    Threads::

        answer               repagent-recv (on_ACK, on_ERROR)
    """

    def __init__(self):
        self.event = threading.Event()
        self.answer_msg: p.Message | None = None

    def answer(self, msg: p.Message) -> None:
        """Recv loop (on_ACK / on_ERROR)."""
        self.answer_msg = msg
        self.event.set()


def agent_checkpoint(agent: Agent, name: str) -> dict:
    """Queue a CHECKPOINT on the ordered hub stream, after every write queued so
    far, and wait for the hub's answer (repagent-control thread)."""
    try:
        p.validate_name(name, "checkpoint name")
    except p.ReplicationError as err:
        return {"error": str(err)}
    waiter = CheckpointWaiter()
    deadline = time.monotonic() + CHECKPOINT_TIMEOUT
    while True:
        with agent.lock:
            conn = agent.conn
            if conn is None:
                return {"error": "not connected to the hub; try again"}
            # Writes held behind a hub read are answered but not yet queued: a
            # checkpoint queued now would land before them.  Wait until none is.
            if not any(v.held for v in agent.volumes):
                req = agent.stream.next_req()
                agent.link.requests[req] = ("CHECKPOINT", waiter)
                seq = agent.stream.enqueue(conn, p.Checkpoint(request_id=req, name=name))
                break
        if time.monotonic() > deadline:
            return {"error": "writes stayed held behind the hub's sync reads for "
                             f"{CHECKPOINT_TIMEOUT:.0f} s; try again after the sync"}
        time.sleep(0.01)
    log.info("--> CHECKPOINT %r req=%d (stream seq %d)", name, req, seq)
    if not waiter.event.wait(CHECKPOINT_TIMEOUT):
        with agent.lock:
            agent.link.requests.pop(req, None)
        return {"error": f"no answer from the hub within {CHECKPOINT_TIMEOUT:.0f} s"}
    msg = waiter.answer_msg
    if isinstance(msg, p.Error):
        return {"error": f"hub refused the checkpoint: {msg.code_name()} {msg.message}"}
    return {"ok": True, "name": name, "request_id": req, "stream_seq": seq,
            "reply": msg.TYPE.name}


def cmd_checkpoint(args) -> int:
    """Ask the running protect agent (control socket) for a checkpoint; print the ACK."""
    try:
        p.validate_name(args.name, "checkpoint name")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(CHECKPOINT_TIMEOUT + CONTROL_TIMEOUT)
            s.connect(os.path.join(args.state_dir, "control.sock"))
            s.sendall(f"checkpoint {args.name}\n".encode())
            buf = bytearray()
            while not buf.endswith(b"\n"):
                data = s.recv(65536)
                if not data:
                    break
                buf += data
        res = json.loads(buf)
    except (OSError, ValueError, p.ReplicationError) as err:
        print(f"repagent.py: checkpoint: no answer from the agent on "
              f"{args.state_dir}/control.sock: {err}", file=sys.stderr)
        return 1
    if not res.get("ok"):
        print(f"repagent.py: checkpoint {args.name}: {res.get('error')}", file=sys.stderr)
        return 1
    print(f"checkpoint {res['name']}: {res['reply']} from the hub (req={res['request_id']})")
    return 0


def cmd_qmp(args) -> int:
    """Send one QMP command to QSD and print its answer as JSON (for the
    operator's steps around a fail-back: remove the VM's export, add it back
    above the mirror's filter node)."""
    try:
        arguments = json.loads(args.arguments) if args.arguments else {}
        if not isinstance(arguments, dict):
            raise ValueError("the arguments must be a JSON object")
    except ValueError as err:
        print(f"repagent.py: qmp: arguments {args.arguments!r}: {err}", file=sys.stderr)
        return 2
    try:
        qmp = QMPClient(check_unix_path(args.qmp, "--qmp"))
    except (OSError, ValueError, QMPClosed) as err:
        hint = (" (QSD serves one client per monitor: is another one, the running agent "
                "perhaps, holding this socket?)" if isinstance(err, TimeoutError) else "")
        print(f"repagent.py: qmp: cannot talk to QSD on {args.qmp}: {err}{hint}",
              file=sys.stderr)
        return 1
    try:
        print(json.dumps(qmp.execute(args.command_name, **arguments), indent=2))
        return 0
    except (QMPError, QMPClosed, TimeoutError) as err:
        print(f"repagent.py: qmp: {args.command_name}: {err}", file=sys.stderr)
        return 1
    finally:
        qmp.close()


# ---------------------------------------------------------------------------
# Command line


def unasked(msg: p.Message) -> p.Error:
    """The ERROR for an answer to no request of ours outstanding (PROTOCOL.md
    ER-7): it is not acted on, and the hub hears why."""
    return p.Error(request_id=msg.request_id, code=p.ErrorCode.INVALID, failed_type=msg.TYPE,
                   message=f"{msg.TYPE.name} req={msg.request_id} answers no outstanding "
                           "request of the agent")


def parse_point(text: str) -> str:
    """``--at``: ``latest``, a checkpoint name or an RFC 3339 UTC time, the one
    grammar the hub takes (PROTOCOL.md RC-8), checked before connecting."""
    try:
        if text == "latest" or p.parse_point_time(text) is not None:
            return text
        return p.validate_name(text, "checkpoint name")
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--at: {err}") from None
    except p.InvalidField as err:
        raise argparse.ArgumentTypeError(
            f"--at {text!r} is not 'latest', a checkpoint name or an RFC 3339 UTC time "
            f"such as 2026-11-25T18:00:00Z ({err})") from None


def parse_node(text: str) -> tuple[str, str]:
    node, sep, volume = text.partition("=")
    if not sep or not node or not volume:
        raise argparse.ArgumentTypeError(f"--node {text!r}: expected NODE=VOLUME")
    try:
        p.validate_name(volume, "volume name")
    except p.InvalidField as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return node, volume


def parse_source(text: str):
    node, sep, uri = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--source {text!r}: expected NODE=NBD-URI")
    try:
        return node, parse_nbd_uri(uri)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repagent.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("protect", help="replicate QSD nodes to a hub until SIGTERM",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="The hub's sync READs are served from --source NODE=URI "
                               "(QSD's NBD export of the node:\n"
                               "nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT); "
                               "a node without --source\nmust be raw over a plain file, "
                               "which is then read directly.")
    pr.add_argument("--hub", required=True, type=parse_host_port, help="HOST:PORT of rephub")
    pr.add_argument("--agent-id", required=True)
    pr.add_argument("--secret-file", required=True,
                    help="file holding the 64-hex-digit secret (rephub.py add-agent)")
    pr.add_argument("--qmp", required=True, help="QSD's QMP unix socket")
    pr.add_argument("--node", required=True, action="append", type=parse_node,
                    metavar="NODE=VOLUME",
                    help="protect QSD block node NODE as hub volume VOLUME (repeatable)")
    pr.add_argument("--source", action="append", type=parse_source, default=[],
                    metavar="NODE=NBD-URI",
                    help="where to read NODE for the hub's sync (QSD's NBD export)")
    pr.add_argument("--state-dir", required=True,
                    help="bitmaps, metadata and sockets; keep it across restarts")
    pr.add_argument("--mode", choices=("sync", "async"), default="async")
    pr.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK,
                    help="dirty-tracking granularity (default 64K)")
    pr.add_argument("--sync-timeout", type=float, default=DEFAULT_SYNC_TIMEOUT,
                    help="sync mode: longest wait for the hub's ACK before degrading (s)")
    pr.add_argument("--hub-timeout", type=float, default=DEFAULT_HUB_TIMEOUT,
                    help="a hub silent this long is treated as down (s)")
    pr.add_argument("--max-queue", type=parse_size, default=DEFAULT_MAX_QUEUE,
                    help="bytes of writes queued for the hub before dropping to "
                         "bitmap-only tracking (default 64M)")
    pr.add_argument("--tls-ca", help="connect with TLS, trusting this CA file")
    pr.add_argument("--reconnect-delay", type=int, default=DEFAULT_RECONNECT_DELAY,
                    help="QEMU NBD client reconnect-delay for the mirror target (s)")
    pr.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT,
                    help="on SIGTERM, how long to wait for the hub's ACKs (s)")
    pr.add_argument("--max-backoff", type=float, default=BACKOFF_MAX,
                    help="longest wait between attempts to reach a hub that refuses or "
                         f"fails (s, default {BACKOFF_MAX:g}; doubling from "
                         f"{BACKOFF_MIN:g})")
    pr.add_argument("--unprotect", action="store_true",
                    help="on SIGTERM also tear the mirror jobs down")
    pr.add_argument("--fsync-bitmap", action="store_true",
                    help="msync the bitmap before answering QEMU (host-crash durability)")
    pr.add_argument("--metrics-listen", type=parse_host_port, metavar="HOST:PORT",
                    help="serve Prometheus metrics on http://HOST:PORT/metrics")
    pr.add_argument("--accept-failback", action="store_true",
                    help="let the hub write a demoted volume back (rephub.py failback): "
                         "only once the VM is stopped and its export removed; needs "
                         "--source for QSD's NBD server")
    pr.add_argument("--log-level", default="INFO")

    un = sub.add_parser("unprotect", help="tear the mirror jobs down (agent not running)")
    un.add_argument("--qmp", required=True)
    un.add_argument("--node", required=True, action="append", type=parse_node,
                    metavar="NODE=VOLUME")
    un.add_argument("--state-dir", required=True)
    un.add_argument("--log-level", default="INFO")

    st = sub.add_parser("status", help="show the running agent's state")
    st.add_argument("--state-dir", required=True)
    add_status_options(st)
    st.add_argument("--log-level", default="WARNING")

    rc = sub.add_parser("recover", help="serve a replica at a point as an NBD export for a "
                        "recovery VM; every IO goes to the hub (fail-over test or fail-over)")
    rc.add_argument("--hub", required=True, type=parse_host_port, help="HOST:PORT of rephub")
    rc.add_argument("--agent-id", required=True)
    rc.add_argument("--secret-file", required=True)
    rc.add_argument("--volume", required=True, help="hub volume name")
    rc.add_argument("--at", required=True, type=parse_point,
                    help="latest | checkpoint name | RFC 3339 UTC time (2026-11-25T18:00:00Z)")
    how = rc.add_mutually_exclusive_group(required=True)
    how.add_argument("--test", action="store_true",
                     help="fail-over test: writes go to a scratch overlay at the hub")
    how.add_argument("--failover", action="store_true",
                     help="promote the volume at the point; writes become its history")
    rc.add_argument("--listen", required=True, help="unix:PATH or HOST:PORT of the NBD export")
    rc.add_argument("--hub-timeout", type=float, default=DEFAULT_HUB_TIMEOUT)
    rc.add_argument("--tls-ca", help="connect with TLS, trusting this CA file")
    rc.add_argument("--log-level", default="INFO")

    cp = sub.add_parser("checkpoint", help="put a named CHECKPOINT on the running agent's "
                        "hub stream (after every write it has taken so far)")
    cp.add_argument("--state-dir", required=True)
    cp.add_argument("name")
    cp.add_argument("--log-level", default="WARNING")

    qm = sub.add_parser("qmp", help="send one QMP command to QSD, print the answer "
                        "(e.g. to remove or add the VM's export around a fail-back)",
                        epilog="QSD serves one client per monitor socket: use a monitor "
                        "the running agent does not hold.  Example: repagent.py qmp "
                        "--qmp /run/qsd/admin.sock block-export-del '{\"id\": \"vm1\"}'")
    qm.add_argument("--qmp", required=True, help="QSD's QMP unix socket")
    qm.add_argument("command_name", metavar="COMMAND", help="a QMP command, e.g. "
                    "query-block-exports")
    qm.add_argument("arguments", nargs="?", metavar="ARGS",
                    help="its arguments as a JSON object")
    qm.add_argument("--log-level", default="WARNING")
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")


def cmd_protect(args) -> int:
    try:
        secret = read_secret_file(args.secret_file)
        p.validate_name(args.agent_id, "agent id")
    except (OSError, ValueError, p.ReplicationError) as err:
        print(f"repagent.py: {err}", file=sys.stderr)
        return 2
    cfg = Config(hub=args.hub, agent_id=args.agent_id, secret=secret, qmp=args.qmp,
                 nodes=args.node, state_dir=os.path.abspath(args.state_dir), mode=args.mode,
                 chunk_size=args.chunk_size, sync_timeout=args.sync_timeout,
                 hub_timeout=args.hub_timeout, max_queue=args.max_queue, tls_ca=args.tls_ca,
                 sources=dict(args.source), reconnect_delay=args.reconnect_delay,
                 drain_timeout=args.drain_timeout, unprotect_on_exit=args.unprotect,
                 fsync_bitmap=args.fsync_bitmap, accept_failback=args.accept_failback,
                 max_backoff=args.max_backoff)
    try:
        p.check_chunk_size(cfg.chunk_size)
    except p.InvalidField as err:
        print(f"repagent.py: --chunk-size: {err}", file=sys.stderr)
        return 2
    if not 0 < cfg.max_backoff <= 3600:
        print(f"repagent.py: --max-backoff {cfg.max_backoff:g}: expected more than 0 and "
              "at most 3600 seconds", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        agent = Agent(cfg)      # reads each VOLUME.json
    except (OSError, ValueError) as err:
        log.error("cannot start: %s", err)
        return 1
    try:
        agent.start()
    except (OSError, QMPError, QMPClosed, LookupError, ValueError, BitmapError) as err:
        log.error("cannot start: %s", err)
        agent.stopping.set()
        for vol in agent.volumes:
            if vol.server is not None:
                vol.server.stop()
        return 1
    if args.metrics_listen is not None:
        try:
            agent.metrics = MetricsServer(args.metrics_listen,
                                          lambda: agent_metrics(agent.status()),
                                          "repagent-metrics", log)
        except OSError as err:
            log.error("cannot serve metrics on %s:%d: %s", *args.metrics_listen, err)
            agent.stop()
            return 1
    log.info("protecting %s in %s mode", ", ".join(v.name for v in agent.volumes), cfg.mode)
    while not stop.wait(1.0):
        pass
    agent.stop()
    return 0


def cmd_unprotect(args) -> int:
    state_dir = os.path.abspath(args.state_dir)
    lockfile = open_lockfile(state_dir)
    try:
        fcntl.flock(lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("repagent.py: the agent still runs on this state dir: stop it first "
              "(or run it with --unprotect)", file=sys.stderr)
        return 1
    qmp = QMPClient(args.qmp)
    rc = 0
    try:
        for node, volume in args.node:
            try:
                vol = Volume(volume, node, state_dir)
            except (OSError, ValueError) as err:
                print(f"repagent.py: {volume}: {err}", file=sys.stderr)
                rc = 1
                continue
            try:
                teardown_mirror(qmp, vol.meta)
                vol.meta["mirror"] = False
                vol.meta["needs_verify"] = True     # writes from now on are not tracked
                vol.save_meta()
                print(f"{volume}: mirror of node {node} removed")
            except (QMPError, TimeoutError) as err:
                print(f"repagent.py: {volume}: {err}", file=sys.stderr)
                rc = 1
    finally:
        qmp.close()
    return rc


def query_status(state_dir: str, timeout: float = CONTROL_TIMEOUT) -> dict:
    """Ask the running agent for its status (any process)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(os.path.join(state_dir, "control.sock"))
        s.sendall(b"status\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            data = s.recv(65536)
            if not data:
                break
            buf += data
    return json.loads(buf)


def format_status(status: dict) -> str:
    """``repagent.py status`` for a person: the link, then one row per volume."""
    age = status["last_ack_age_s"]
    cause = f" ({status['link_cause']})" if status["connection"] != "connected" \
        and status["link_cause"] else ""
    if status.get("retry_in_s") is not None:
        cause += f", next attempt in {status['retry_in_s']:.1f} s"
    rtt = status.get("rtt_s")
    lines = [f"agent {status['agent_id']} -> hub {status['hub']}: {status['connection']}{cause}",
             f"mode {status['mode']}, queue {status['queue_frames']} frames / "
             f"{fmt_bytes(status['queue_bytes'])}, {status['pending_writes']} writes not ACKed, "
             f"last ACK {'never' if age is None else f'{age:.1f} s ago'}, "
             f"RTT {'-' if rtt is None else f'{rtt * 1e3:.2f} ms'}"]
    gone = status.get("last_disconnect")
    if gone and status["connection"] == "connected":   # else the first line says why
        lines.append(f"last disconnect {max(0.0, time.time() - gone['at']):.1f} s ago, "
                     f"{gone['lived_s']:.1f} s after connecting: {gone['reason']}")
    lines.append("")
    rows = []
    for v in status["volumes"]:
        role = v.get("role", "protected")
        if v.get("refused") and not v["attached"]:
            hub_side = "refused by the hub"
        elif v["needs_verify"] and not v["attached"]:
            hub_side = "detached, verify due"
        elif role == "failing back":
            hub_side = f"attached, failing back ({fmt_bytes(v['failback']['put_bytes'])} put)"
        elif role == "demoted":
            hub_side = ("attached" if v["attached"] else "detached") + ", demoted"
        else:
            hub_side = ("attached" if v["attached"] else "detached") + \
                (f", {v['plan'].lower()} sync" if v["plan"] not in (None, "NONE") else "")
        job = v["job"] + (" (paused)" if v.get("job_paused") else "")
        if v.get("job_remaining_bytes"):
            job += f", {fmt_bytes(v['job_remaining_bytes'])} to copy"
        rows.append([v["volume"], v["node"], fmt_bytes(v["size"]), hub_side,
                     fmt_bytes(v["dirty_bytes"]), f"{v['queue_frames']}",
                     fmt_bytes(v["queue_bytes"]),
                     fmt_bytes(v["counters"].get("sent_bytes", 0)
                               + v["counters"].get("read_reply_bytes", 0)), job])
    lines += format_table(["VOLUME", "NODE", "SIZE", "HUB", "DIRTY", "QUEUED", "QUEUE BYTES",
                           "SENT", "MIRROR JOB"], rows, right=(2, 4, 5, 6, 7))
    for v in status["volumes"]:
        if v.get("refused") and not v["attached"]:
            lines.append(f"{v['volume']}: the hub refused it: {v['refused']}")
    errors = {k: n for k, n in sorted(status.get("errors", {}).items()) if n}
    if errors:
        lines.append("warnings since start: " + ", ".join(f"{k} {n}" for k, n in errors.items())
                     + " (see the log)")
    return "\n".join(lines)


def cmd_status(args) -> int:
    if args.watch is not None:
        try:
            return watch(lambda: query_status(args.state_dir), format_status, args.watch,
                         args.json, (OSError, ValueError))
        except ValueError as err:  # the interval
            print(f"repagent.py: {err}", file=sys.stderr)
            return 2
    try:
        status = query_status(args.state_dir)
    except (OSError, ValueError) as err:
        print(f"repagent.py: no agent answers on {args.state_dir}/control.sock: {err}",
              file=sys.stderr)
        return 1
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return {"protect": cmd_protect, "unprotect": cmd_unprotect,
            "status": cmd_status, "recover": cmd_recover,
            "checkpoint": cmd_checkpoint, "qmp": cmd_qmp}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
