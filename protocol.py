"""Replication wire protocol v1: the codec shared by repagent, rephub and tests.

This module is the executable form of PROTOCOL.md.  It turns messages into
bytes and bytes into messages and does no I/O of its own (it never imports
``socket`` or ``threading``), so the agent, the hub, the test-suite and other
implementations' harnesses all share one codec.  The few lines of blocking
socket glue the single-file agent and hub use (``recv_message``,
``send_message``) sit at the end, apart from the codec.

Every message is one frame: a fixed 48-byte header (PROTOCOL.md "Frame
header") followed by ``payload_length`` bytes of payload::

    offset size field
     0      4  magic           0x52504C31 ("RPL1")
     4      1  version         1
     5      1  type            MsgType
     6      2  flags           bits 0-7 must be understood, 8-15 may be ignored
     8      8  request_id      chosen by the requester, echoed by the answer
    16      4  volume          hub-assigned volume (or recovery session) id
    20      4  payload_length  <= MAX_PAYLOAD
    24      8  offset          byte offset in the volume
    32      8  length          byte length of the addressed range
    40      4  payload_crc     CRC-32 of the payload
    44      4  header_crc      CRC-32 of bytes 0..43

A message class names which of request_id, volume, offset and length it
uses; a sender MUST send the others as zero and a receiver rejects a frame
where they are not (``InvalidField``).  Payload layouts are documented on each
message class.

Exception tree (PROTOCOL.md "Error handling")::

    ReplicationError
     +-- ProtocolError            the peer broke the protocol: close the connection
     |    +-- BadMagic
     |    +-- BadVersion
     |    +-- BadHeaderCRC
     |    +-- BadPayloadCRC
     |    +-- PayloadTooLarge
     |    +-- TruncatedFrame
     |    +-- BadRequestId        a request with request_id 0 (or, at the hub, one
     |                            already outstanding): answers could not be matched
     +-- RequestError             this request failed: answer ERROR(code), carry on
          +-- UnsupportedMessage  unknown message type (the frame is skipped)
          +-- UnsupportedFlags    a must-understand flag bit that is not defined
          +-- InvalidField        a field has a value the spec does not allow
          +-- OutOfRange          an offset/length that overflows or runs past the volume

A ``RequestError`` is raised only after the whole frame was consumed, so the
receiver can answer ``ERROR`` with ``err.code`` and ``err.request_id`` and read
the next frame.  Application code raises ``RequestError(code, message)`` for
its own refusals (not the owner, no such volume, ...).
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime
import enum
import functools
import hashlib
import hmac
import json
import re
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

# ---------------------------------------------------------------------------
# Constants (PROTOCOL.md "Values")

MAGIC = 0x52504C31  # "RPL1"
VERSION = 1
SUPPORTED_VERSIONS = (1,)

#: The largest data a single WRITE, READ_REPLY, RWRITE or RREAD_REPLY carries.
#: QEMU's NBD client never sends more than 32 MiB in one request, so one NBD
#: write always fits one frame.
MAX_DATA = 32 * 1024 * 1024
#: Every payload, data or not, fits this; checked before anything is allocated.
MAX_PAYLOAD = MAX_DATA
#: Volume names, agent ids, hub ids and checkpoint names: short, printable,
#: safe as a file name (see ``validate_name``).
MAX_NAME = 128
#: ERROR messages and GOODBYE reasons: enough for a sentence, never a dump.
MAX_TEXT = 1024
#: Before AUTH_OK no payload may exceed this (PROTOCOL.md [SE-3]): the largest
#: message the handshake allows, an ERROR with a MAX_TEXT message (u32 code,
#: u8 type, u16 length, text; HELLO is at most 170 bytes, HELLO_REPLY 202).
#: An unauthenticated peer can so make a receiver allocate 1031 bytes, not 32 MiB.
MAX_HANDSHAKE_PAYLOAD = 4 + 1 + 2 + MAX_TEXT
#: A point in time as text: "latest", a checkpoint name or an RFC 3339 UTC
#: time stamp (``parse_point_time``).
MAX_POINT = MAX_NAME
#: Chunk sizes (dirty tracking, checksums) are powers of two in this range.
MIN_CHUNK = 4096
MAX_CHUNK = 64 * 1024 * 1024
#: Volumes are addressed with signed 64-bit offsets by QEMU; keep the same bound.
MAX_VOLUME_SIZE = (1 << 63) - 1
NONCE_SIZE = 32
DIGEST_SIZE = 32  # HMAC-SHA256 and SHA-256
GENERATION_SIZE = 16

HEADER_SIZE = 48


class MsgType(enum.IntEnum):
    """Message types (PROTOCOL.md "Message types", under "Values")."""

    HELLO = 0x01
    HELLO_REPLY = 0x02
    AUTH = 0x03
    AUTH_OK = 0x04
    ATTACH = 0x10
    ATTACHED = 0x11
    DETACH = 0x12
    WRITE = 0x20
    ZERO = 0x21
    ACK = 0x22
    FLUSH = 0x23
    READ = 0x30
    READ_REPLY = 0x31
    DIRTY_QUERY = 0x32
    DIRTY_MAP = 0x33
    CHECKSUM_QUERY = 0x34
    CHECKSUMS = 0x35
    SYNCED = 0x36
    EXTENT_QUERY = 0x37
    EXTENTS = 0x38
    CHECKPOINT = 0x40
    RECOVER_OPEN = 0x50
    RECOVER_READY = 0x51
    RREAD = 0x52
    RREAD_REPLY = 0x53
    RWRITE = 0x54
    RFLUSH = 0x55
    RECOVER_CLOSE = 0x56
    PING = 0x60
    PONG = 0x61
    ERROR = 0x62
    GOODBYE = 0x63
    FAILBACK_BEGIN = 0x70
    PUT = 0x71
    FAILBACK_END = 0x72


#: Flag bits 0-7 must be understood by the receiver; 8-15 may be ignored.
FLAG_ZERO = 1 << 0  # READ_REPLY, RREAD_REPLY, RWRITE: the range is zeroes, no payload
MUST_UNDERSTAND_FLAGS = 0x00FF


class Feature(enum.IntFlag):
    """Feature bits offered in HELLO and granted in HELLO_REPLY (PROTOCOL.md
    "Feature bits")."""

    NONE = 0
    EXTENTS = 1 << 0   # the hub may ask EXTENT_QUERY: sparse-aware sync
    FAILBACK = 1 << 1  # DEMOTED attach, FAILBACK_BEGIN / PUT / FAILBACK_END
    GOODBYE_CODE = 1 << 2  # GOODBYE carries a GoodbyeCode after its reason text


class ErrorCode(enum.IntEnum):
    """Codes carried by ERROR (PROTOCOL.md "Error codes", under "Values")."""

    UNSUPPORTED = 1      # unknown message type or flag, or a feature not offered
    INVALID = 2          # a field has a value the spec does not allow
    OUT_OF_RANGE = 3     # offset/length past the volume's end or overflowing
    NO_SUCH_VOLUME = 4   # volume id or name not known (or not attached)
    NOT_OWNER = 5        # the volume belongs to another agent
    BAD_NAME = 6         # a name that is not a valid name
    AUTH_FAILED = 7      # handshake proof wrong, unknown agent
    BAD_PHASE = 8        # a message not allowed in this phase of the connection
    IO_ERROR = 9         # the receiver failed to read or write its storage
    ROLE = 10            # the volume was promoted: the old protected side may not write
    BAD_POINT = 11       # point in time unknown or outside the journal window
    BUSY = 12            # the resource is in use (a recovery session already open, ...)
    VERSION = 13         # no protocol version in common
    INCONSISTENT = 14    # the volume is not consistent yet: cannot recover from it
    SHUTTING_DOWN = 15   # the receiver is stopping; try again later
    PROTOCOL = 16        # the peer broke the protocol; the connection is closed
    NOT_ALLOWED = 17     # the receiver's operator has not allowed this (fail-back)


class VolumeState(enum.IntEnum):
    """What the agent knows of a volume's pending writes, sent in ATTACH."""

    CLEAN = 0    # every write it received was acknowledged by the hub
    DIRTY = 1    # its dirty bitmap is trustworthy; DIRTY_QUERY lists the regions
    UNKNOWN = 2  # nothing trustworthy (bitmap lost, QEMU restarted): verify


class SyncPlan(enum.IntEnum):
    """The hub's decision in ATTACHED (PROTOCOL.md "Sync plans")."""

    NONE = 0    # the replica is current; only new writes follow
    DIRTY = 1   # the hub will DIRTY_QUERY and READ the dirty regions
    VERIFY = 2  # the hub will compare checksums and READ what differs
    FULL = 3    # the hub will READ the whole volume
    DEMOTED = 4  # promoted at the recovery site: no writes taken, fail-back may follow


class ChecksumAlgo(enum.IntEnum):
    SHA256 = 1


class GoodbyeCode(enum.IntEnum):
    """GOODBYE ``code`` (feature GOODBYE_CODE): why the sender closes, for
    programs; the ``reason`` text is for humans only.  A code the receiver
    does not know means UNSPECIFIED (PROTOCOL.md [LV-5])."""

    UNSPECIFIED = 0        # no reason given (and what a GOODBYE without a code means)
    SHUTDOWN = 1           # the sender stops or closes in order: connect again later
    FAILED_BACK = 2        # a fail-back ended this recovery session: the volume went home
    STORAGE_RECOVERED = 3  # the hub's storage recovered: attach again to resync (RP-11)


class FailbackOutcome(enum.IntEnum):
    """FAILBACK_END ``outcome``."""

    DONE = 0   # every PUT is in: the volume equals the hub's; protection resumes
    ABORT = 1  # the fail-back is abandoned: resume as before (still DEMOTED)


#: EXTENTS extent flag: the extent reads as zeroes.
EXTENT_ZERO = 1 << 0


class RecoverMode(enum.IntEnum):
    TEST = 1      # writes go to a scratch overlay discarded at RECOVER_CLOSE
    FAILOVER = 2  # the hub promotes the volume; writes become its history


# ---------------------------------------------------------------------------
# Errors


class ReplicationError(Exception):
    """Root of every error this protocol raises."""

    code = ErrorCode.PROTOCOL

    def __init__(self, message: str, *, code: ErrorCode | None = None,
                 request_id: int = 0, msg_type: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.request_id = request_id
        self.msg_type = msg_type


class ProtocolError(ReplicationError):
    """The peer broke the protocol: send ERROR(PROTOCOL) if you can, then close."""


class BadMagic(ProtocolError):
    pass


class BadVersion(ProtocolError):
    pass


class BadHeaderCRC(ProtocolError):
    pass


class BadPayloadCRC(ProtocolError):
    pass


class PayloadTooLarge(ProtocolError):
    pass


class TruncatedFrame(ProtocolError):
    pass


class BadRequestId(ProtocolError):
    """A request whose request_id is 0, or equal to one of the same peer's
    requests still outstanding (PROTOCOL.md [RP-12]): its answer could not be
    matched to it, so no ACK of this connection could be trusted."""


class RequestError(ReplicationError):
    """This request failed: answer ERROR(code) to its request id and go on."""

    code = ErrorCode.INVALID

    def __init__(self, message: str, *, code: ErrorCode | None = None,
                 request_id: int = 0, msg_type: int | None = None):
        super().__init__(message, code=code, request_id=request_id, msg_type=msg_type)


class UnsupportedMessage(RequestError):
    code = ErrorCode.UNSUPPORTED


class UnsupportedFlags(RequestError):
    code = ErrorCode.UNSUPPORTED


class InvalidField(RequestError):
    code = ErrorCode.INVALID


class OutOfRange(RequestError):
    code = ErrorCode.OUT_OF_RANGE


ERROR_CLASSES: dict[str, type[ReplicationError]] = {
    cls.__name__: cls for cls in (
        ReplicationError, ProtocolError, BadMagic, BadVersion, BadHeaderCRC,
        BadPayloadCRC, PayloadTooLarge, TruncatedFrame, BadRequestId, RequestError,
        UnsupportedMessage, UnsupportedFlags, InvalidField, OutOfRange)
}

# ---------------------------------------------------------------------------
# Frame header

#: The 44 bytes the header CRC covers (PROTOCOL.md "Frame header").
HEADER_BODY = struct.Struct("!IBBHQIIQQI")
#: The complete header: the body followed by its CRC.
HEADER = struct.Struct("!IBBHQIIQQII")


@dataclass(frozen=True)
class Header:
    """A frame header whose magic, version, CRC and payload length are valid."""

    type: int
    flags: int
    request_id: int
    volume: int
    payload_length: int
    offset: int
    length: int
    payload_crc: int


def parse_header(buf: bytes | bytearray | memoryview) -> Header:
    """Parse and check the 48-byte frame header at the start of ``buf``.

    Raises ``ProtocolError`` (close the connection): bad magic, version,
    header CRC, or a payload length over MAX_PAYLOAD.  The message type and
    flags are checked later, by ``decode_body``, once the payload is consumed.
    """
    if len(buf) < HEADER_SIZE:
        raise TruncatedFrame(f"frame header is {len(buf)} bytes, expected {HEADER_SIZE}")
    (magic, version, msg_type, flags, request_id, volume, payload_length,
     offset, length, payload_crc, header_crc) = HEADER.unpack_from(buf)
    if magic != MAGIC:
        hint = " (a TLS record: the peer speaks TLS)" if looks_like_tls(buf) else ""
        raise BadMagic(f"bad magic 0x{magic:08x}, expected 0x{MAGIC:08x}{hint}")
    if version != VERSION:
        raise BadVersion(f"bad frame version {version}, expected {VERSION}")
    crc = zlib.crc32(memoryview(buf)[:HEADER_SIZE - 4])
    if header_crc != crc:
        raise BadHeaderCRC(f"bad header_crc 0x{header_crc:08x}, computed 0x{crc:08x}")
    if payload_length > MAX_PAYLOAD:
        raise PayloadTooLarge(
            f"payload_length {payload_length} exceeds MAX_PAYLOAD {MAX_PAYLOAD}")
    return Header(msg_type, flags, request_id, volume, payload_length,
                  offset, length, payload_crc)


def check_handshake_header(header: Header) -> None:
    """Before AUTH_OK: refuse a payload over MAX_HANDSHAKE_PAYLOAD [SE-3].

    Called between ``parse_header`` and reading the payload, so an
    unauthenticated peer never makes the receiver allocate more than the
    handshake needs.  Raises ``PayloadTooLarge`` (close the connection).
    """
    if header.payload_length > MAX_HANDSHAKE_PAYLOAD:
        raise PayloadTooLarge(f"payload_length {header.payload_length} before AUTH_OK "
                              f"exceeds MAX_HANDSHAKE_PAYLOAD {MAX_HANDSHAKE_PAYLOAD}")


#: TLS record content types a TLS peer sends first: a ClientHello or ServerHello
#: is a handshake record (22), a refusal an alert (21) (RFC 8446 section 5.1).
TLS_HANDSHAKE_RECORD = 0x16
TLS_ALERT_RECORD = 0x15


def looks_like_tls(buf: bytes | bytearray | memoryview) -> bool:
    """Do these first bytes of a stream look like a TLS record, not a frame?

    A TLS record starts with its content type (handshake 0x16 or alert 0x15)
    and a legacy version 0x03 0x00..0x04; a frame starts with ``RPL1``.  A hub
    without TLS reading this from a new connection faces a TLS client, and an
    agent without TLS reading it in answer to HELLO faces a TLS hub.
    """
    head = bytes(buf[:3])
    return (len(head) >= 2 and head[0] in (TLS_HANDSHAKE_RECORD, TLS_ALERT_RECORD)
            and head[1] == 0x03 and (len(head) < 3 or head[2] <= 0x04))


def encode_header(msg_type: int, flags: int, request_id: int, volume: int,
                  payload_length: int, offset: int, length: int,
                  payload_crc: int) -> bytearray:
    """Pack a header with its CRC; no check beyond the field widths."""
    buf = bytearray(HEADER_SIZE)
    try:
        HEADER_BODY.pack_into(buf, 0, MAGIC, VERSION, msg_type, flags, request_id,
                              volume, payload_length, offset, length, payload_crc)
    except struct.error as err:
        raise InvalidField(f"header field out of range: {err}") from err
    struct.pack_into("!I", buf, HEADER_SIZE - 4, zlib.crc32(memoryview(buf)[:HEADER_SIZE - 4]))
    return buf


# ---------------------------------------------------------------------------
# Payload helpers

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")

#: Names: an ASCII letter or digit, then letters, digits, '.', '_' or '-'.
#: This excludes '/', '..', NUL and anything a file system would interpret.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid volume/agent/checkpoint name, else raise.

    A valid name is 1..MAX_NAME bytes matching NAME_RE, so it is safe to use
    as a single path component on any POSIX file system.
    """
    if not isinstance(name, str) or not name:
        raise InvalidField(f"{what} is empty", code=ErrorCode.BAD_NAME)
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise InvalidField(f"{what} is {len(name)} characters, at most {MAX_NAME} allowed",
                           code=ErrorCode.BAD_NAME)
    if not NAME_RE.match(name):
        raise InvalidField(f"{what} {name!r} has characters outside [A-Za-z0-9._-] "
                           "or does not start with a letter or digit",
                           code=ErrorCode.BAD_NAME)
    return name


_ZERO_PIECE = bytes(1024 * 1024)


#: The one time stamp grammar of a point (PROTOCOL.md [RC-8]): RFC 3339 in UTC,
#: upper-case ``T`` and ``Z``, 0 to 9 fraction digits.
POINT_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?Z")


def parse_point_time(point: str) -> int | None:
    """A point's time stamp in ns since the Unix epoch, or None if ``point``
    is not written as one (``latest`` and checkpoint names never are: a
    name has no ``:``).  Raises ``ValueError`` for a stamp with the grammar's
    shape and an impossible date or time (month 13, 24:00, Feb 30, a leap
    second, a year before 1970).  The time is exact: missing fraction digits
    are zeroes."""
    m = POINT_TIME.fullmatch(point)
    if m is None:
        return None
    try:
        when = datetime.datetime(*(int(g) for g in m.groups()[:6]))
    except ValueError as err:
        raise ValueError(f"{point!r} is not a time: {err}") from None
    if when.year < 1970:
        raise ValueError(f"{point!r} is before 1970-01-01T00:00:00Z")
    fraction = int((m.group(7) or "").ljust(9, "0"))
    return calendar.timegm(when.timetuple()) * 1_000_000_000 + fraction


def format_point_time(ns: int) -> str:
    """``ns`` since the epoch as a point time stamp with all 9 fraction digits,
    so that ``parse_point_time`` gives ``ns`` back exactly."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


def is_zero(data) -> bool:
    """May ``data`` be sent as FLAG_ZERO (no payload)?  True when every byte is 0.

    Each 1 MiB piece is compared with a zero piece: a memcmp that stops at the
    first data byte, many times faster than ``data.count(0)``, which always
    scans everything (READ_REPLY on the agent, RREAD_REPLY on the hub).
    """
    n = len(_ZERO_PIECE)
    return all(data[i:i + n] == _ZERO_PIECE[:min(n, len(data) - i)]
               for i in range(0, len(data), n))


# CRC-32 of a concatenation from the CRCs of its parts: zlib's crc32_combine,
# which Python's zlib does not expose.  A sender that already summed a payload
# in pieces (the hub checks its replica's bytes against per-chunk sums before
# it answers a read) gives the frame's payload_crc without a second pass.
# The arithmetic is zlib's (crc32.c, multmodp and x2nmodp): a CRC is a
# polynomial over GF(2) in reflected bit order, and appending n zero bytes
# multiplies it by x^(8n) modulo the CRC-32 polynomial.

_CRC_POLY = 0xEDB88320   # the CRC-32 polynomial, reflected


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (reflected; ``a`` must not be 0)."""
    m, product = 1 << 31, 0
    while True:
        if a & m:
            product ^= b
            if not a & (m - 1):
                return product
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    """x^(2^k) modulo the polynomial, k = 0..31."""
    table, power = [], 1 << 30       # x^1
    for _ in range(32):
        table.append(power)
        power = _multmodp(power, power)
    return table


_X2N = _x2n_table()


@functools.lru_cache(maxsize=16)
def _zeros_operator(length: int) -> tuple[list[int], ...]:
    """What appending ``length`` zero bytes does to a CRC, as four tables of
    256 (one per byte of the CRC: the operator is linear over GF(2))."""
    op, n, k = 1 << 31, length, 3    # x^0, and x^(8 * length) = x^(2^3 * length)
    while n:
        if n & 1:
            op = _multmodp(_X2N[k & 31], op)
        n >>= 1
        k += 1
    tables = []
    for byte in range(4):
        bits = [_multmodp(op, 1 << (8 * byte + i)) for i in range(8)]
        table = [0] * 256
        for v in range(1, 256):
            low = v & -v
            table[v] = table[v ^ low] ^ bits[low.bit_length() - 1]
        tables.append(table)
    return tuple(tables)


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """``zlib.crc32(a + b)`` from ``crc1 = zlib.crc32(a)``, ``crc2 = zlib.crc32(b)``
    and ``length2 = len(b)``, without reading either."""
    if length2 == 0:
        return crc1
    t0, t1, t2, t3 = _zeros_operator(length2)
    return (t0[crc1 & 0xFF] ^ t1[(crc1 >> 8) & 0xFF] ^ t2[(crc1 >> 16) & 0xFF]
            ^ t3[crc1 >> 24] ^ crc2)


def crc32_pieces(data, first: int, size: int) -> tuple[int, list[int]]:
    """``zlib.crc32(data)``, and the CRC-32 of each whole ``size``-byte piece of
    ``data`` from byte ``first`` on, in one pass over the data: a receiver that
    keeps sums of fixed-size blocks gets those of a payload's whole blocks for
    the cost of checking its CRC."""
    view = memoryview(data)
    stop = first + max(len(view) - first, 0) // size * size
    crc = zlib.crc32(view[:first])
    pieces = []
    for pos in range(first, stop, size):
        piece = zlib.crc32(view[pos:pos + size])
        pieces.append(piece)
        crc = crc32_combine(crc, piece, size)
    return zlib.crc32(view[stop:], crc), pieces


def check_range(offset: int, length: int, size: int, what: str = "request") -> None:
    """Raise OutOfRange unless [offset, offset+length) lies inside a volume of ``size``."""
    if offset + length > size:
        raise OutOfRange(f"{what} offset {offset} length {length} ends at "
                         f"{offset + length}, past the volume's end {size}")


class _Reader:
    """Cursor over a payload; every read is bounds-checked (InvalidField)."""

    def __init__(self, payload: memoryview, msg_type: MsgType):
        self.buf = payload
        self.pos = 0
        self.msg_type = msg_type

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.buf):
            raise InvalidField(f"{self.msg_type.name} payload too short for {what}: "
                               f"need {n} bytes at {self.pos}, have {len(self.buf) - self.pos}")
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, layout: struct.Struct, what: str) -> tuple:
        return layout.unpack(self.take(layout.size, what))

    def text(self, limit: int, what: str) -> str:
        (n,) = self.unpack(_U16, f"{what} length")
        if n > limit:
            raise InvalidField(f"{what} length {n} exceeds the limit {limit}")
        raw = self.take(n, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as err:
            raise InvalidField(f"{what} is not valid UTF-8: {err}") from err

    def rest(self) -> memoryview:
        view = self.buf[self.pos:]
        self.pos = len(self.buf)
        return view

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise InvalidField(f"{self.msg_type.name} payload has {len(self.buf) - self.pos} "
                               "unexpected trailing bytes")


def _clip(value: str, limit: int) -> str:
    """Cut ``value`` to at most ``limit`` UTF-8 bytes, on a character boundary."""
    return value.encode("utf-8")[:limit].decode("utf-8", "ignore")


def _fixed(value, size: int, what: str) -> bytes:
    """A fixed-size byte field (nonce, proof, generation): exactly ``size`` bytes.

    ``struct``'s ``Ns`` format would silently pad or cut a wrong-sized value.
    """
    value = bytes(value)
    if len(value) != size:
        raise InvalidField(f"{what} is {len(value)} bytes, expected {size}")
    return value


def _text(value: str, limit: int, what: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > limit:
        raise InvalidField(f"{what} is {len(raw)} bytes, at most {limit} allowed")
    return _U16.pack(len(raw)) + raw


# ---------------------------------------------------------------------------
# Messages

_REGISTRY: dict[int, type[Message]] = {}


@dataclass
class Message:
    """Base of every message.

    Subclasses set ``TYPE``, ``HEADER_FIELDS`` (the header fields they use;
    the rest must be zero), ``FLAGS`` (the must-understand flags they accept)
    and implement ``_payload``/``_parse``.
    """

    TYPE: ClassVar[MsgType]
    HEADER_FIELDS: ClassVar[tuple[str, ...]] = ()
    FLAGS: ClassVar[int] = 0

    request_id: int = 0
    volume: int = 0
    offset: int = 0
    length: int = 0
    flags: int = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "TYPE" in cls.__dict__:
            _REGISTRY[cls.TYPE] = cls

    # -- encoding ----------------------------------------------------------

    def _payload(self) -> list:
        """The payload as a list of bytes-like parts (no copy of data)."""
        return []

    def encode(self, payload_crc: int | None = None) -> list:
        """Return [header, payload parts...] ready for scatter/gather send.

        ``payload_crc``: the payload's CRC-32, when the sender has it already
        (summed as it read the bytes it sends); otherwise it is computed here.
        """
        parts = self._payload()
        payload_length = sum(memoryview(p).nbytes for p in parts)
        if payload_length > MAX_PAYLOAD:
            raise PayloadTooLarge(f"{self.TYPE.name} payload of {payload_length} bytes "
                                  f"exceeds MAX_PAYLOAD {MAX_PAYLOAD}")
        crc = payload_crc
        if crc is None:
            crc = 0
            for part in parts:
                crc = zlib.crc32(part, crc)
        header = encode_header(self.TYPE, self.flags, self.request_id, self.volume,
                               payload_length, self.offset, self.length, crc)
        return [header, *parts]

    def to_bytes(self) -> bytes:
        return b"".join(self.encode())

    # -- decoding ----------------------------------------------------------

    @classmethod
    def _parse(cls, header: Header, payload: _Reader) -> dict:
        """Return the payload fields as keyword arguments."""
        payload.end()
        return {}

    def check(self) -> None:
        """Semantic checks after decoding (lengths, ranges); raise RequestError."""

    def describe(self) -> str:
        """One line for trace logs: ``WRITE req=7 vol=1 off=4096 len=65536``."""
        bits = [self.TYPE.name]
        for name in ("request_id", "volume", "offset", "length"):
            if name in self.HEADER_FIELDS:
                bits.append(f"{_SHORT[name]}={getattr(self, name)}")
        if self.flags:
            bits.append(f"flags=0x{self.flags:x}")
        return " ".join(bits)

    def fields(self) -> dict:
        """The decoded fields, as in the vectors' "fields" objects."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (bytes, bytearray, memoryview)):
                value = bytes(value).hex()
            elif isinstance(value, list):
                value = [list(v) if isinstance(v, tuple) else
                         (bytes(v).hex() if isinstance(v, (bytes, memoryview)) else v)
                         for v in value]
            elif isinstance(value, enum.Enum):
                value = value.name if str(f.type) in _ENUM_HINTS else int(value)
            out[f.name] = value
        return out


_SHORT = {"request_id": "req", "volume": "vol", "offset": "off", "length": "len"}
_DATA_FIELDS = ("request_id", "volume", "offset", "length")


# Handshake (PROTOCOL.md "Handshake phase") ----------------------------------

_HELLO = struct.Struct("!BBHI32s")  # min_version, max_version, reserved, features, nonce


@dataclass
class Hello(Message):
    """A: agent -> hub, first frame.

    Payload: u8 min_version, u8 max_version, u16 reserved (0), u32 features,
    32 bytes nonce, u16 agent_id length + agent_id (UTF-8).
    """

    TYPE = MsgType.HELLO
    min_version: int = VERSION
    max_version: int = VERSION
    features: int = 0
    nonce: bytes = bytes(NONCE_SIZE)
    agent_id: str = ""

    def _payload(self):
        return [_HELLO.pack(self.min_version, self.max_version, 0, self.features,
                            _fixed(self.nonce, NONCE_SIZE, "HELLO nonce")),
                _text(self.agent_id, MAX_NAME, "agent_id")]

    @classmethod
    def _parse(cls, header, r):
        lo, hi, reserved, features, nonce = r.unpack(_HELLO, "versions, features and nonce")
        if reserved:
            raise InvalidField(f"HELLO reserved field is {reserved}, expected 0")
        agent_id = r.text(MAX_NAME, "agent_id")
        r.end()
        return dict(min_version=lo, max_version=hi, features=features,
                    nonce=bytes(nonce), agent_id=agent_id)

    def check(self):
        if self.min_version > self.max_version:
            raise InvalidField(f"HELLO min_version {self.min_version} > "
                               f"max_version {self.max_version}")
        # The hub keys secrets and volume ownership by agent_id: it must be
        # a name that is safe as a path component.
        validate_name(self.agent_id, "agent_id")


_HELLO_REPLY = struct.Struct("!BBHI32s32s")  # version, 3 reserved, features, nonce, proof


@dataclass
class HelloReply(Message):
    """H: hub -> agent.

    Payload: u8 version, u8 + u16 reserved (0), u32 features, 32 bytes hub
    nonce, 32 bytes proof (``hub_proof``), u16 hub_id length + hub_id.
    """

    TYPE = MsgType.HELLO_REPLY
    version: int = VERSION
    features: int = 0
    nonce: bytes = bytes(NONCE_SIZE)
    proof: bytes = bytes(DIGEST_SIZE)
    hub_id: str = ""

    def _payload(self):
        return [_HELLO_REPLY.pack(self.version, 0, 0, self.features,
                                  _fixed(self.nonce, NONCE_SIZE, "HELLO_REPLY nonce"),
                                  _fixed(self.proof, DIGEST_SIZE, "HELLO_REPLY proof")),
                _text(self.hub_id, MAX_NAME, "hub_id")]

    @classmethod
    def _parse(cls, header, r):
        version, res1, res2, features, nonce, proof = r.unpack(_HELLO_REPLY, "fixed fields")
        if res1 or res2:
            raise InvalidField("HELLO_REPLY reserved fields are not zero")
        hub_id = r.text(MAX_NAME, "hub_id")
        r.end()
        return dict(version=version, features=features, nonce=bytes(nonce),
                    proof=bytes(proof), hub_id=hub_id)


_PROOF = struct.Struct("!32s")


@dataclass
class Auth(Message):
    """A: agent -> hub.  Payload: 32 bytes proof (``agent_proof``)."""

    TYPE = MsgType.AUTH
    proof: bytes = bytes(DIGEST_SIZE)

    def _payload(self):
        return [_PROOF.pack(_fixed(self.proof, DIGEST_SIZE, "AUTH proof"))]

    @classmethod
    def _parse(cls, header, r):
        (proof,) = r.unpack(_PROOF, "proof")
        r.end()
        return dict(proof=bytes(proof))


@dataclass
class AuthOk(Message):
    """H: hub -> agent.  No payload.  The connection is established."""

    TYPE = MsgType.AUTH_OK


# Volumes (PROTOCOL.md "Volumes") ---------------------------------------------

_ATTACH = struct.Struct("!QIBB16s")  # size, chunk_size, state, reserved, generation


@dataclass
class Attach(Message):
    """A: attach a volume.  Header: request_id.

    Payload: u64 size, u32 chunk_size, u8 state (VolumeState), u8 reserved,
    16 bytes generation, u16 name length + name.
    """

    TYPE = MsgType.ATTACH
    HEADER_FIELDS = ("request_id",)
    size: int = 0
    chunk_size: int = 65536
    state: VolumeState = VolumeState.UNKNOWN
    generation: bytes = bytes(GENERATION_SIZE)
    name: str = ""

    def _payload(self):
        return [_ATTACH.pack(self.size, self.chunk_size, self.state, 0,
                             _fixed(self.generation, GENERATION_SIZE, "ATTACH generation")),
                _text(self.name, MAX_NAME, "volume name")]

    @classmethod
    def _parse(cls, header, r):
        size, chunk_size, state, reserved, generation = r.unpack(_ATTACH, "fixed fields")
        if reserved:
            raise InvalidField(f"ATTACH reserved field is {reserved}, expected 0")
        try:
            state = VolumeState(state)
        except ValueError as err:
            raise InvalidField(f"ATTACH state {state} is not a VolumeState "
                               f"(0..{max(VolumeState)})") from err
        name = r.text(MAX_NAME, "volume name")
        r.end()
        return dict(size=size, chunk_size=chunk_size, state=state,
                    generation=bytes(generation), name=name)

    def check(self):
        validate_name(self.name, "volume name")
        check_chunk_size(self.chunk_size)
        if not 0 < self.size <= MAX_VOLUME_SIZE:
            raise InvalidField(f"ATTACH size {self.size} outside 1..{MAX_VOLUME_SIZE}")


def check_chunk_size(chunk_size: int) -> None:
    if not (MIN_CHUNK <= chunk_size <= MAX_CHUNK and chunk_size & (chunk_size - 1) == 0):
        raise InvalidField(f"chunk_size {chunk_size} is not a power of two in "
                           f"{MIN_CHUNK}..{MAX_CHUNK}")


_ATTACHED = struct.Struct("!B3x")  # plan


@dataclass
class Attached(Message):
    """H: the volume is attached.  Header: request_id (the ATTACH's), volume (its id).

    Payload: u8 plan (SyncPlan), 3 bytes reserved (0).
    """

    TYPE = MsgType.ATTACHED
    HEADER_FIELDS = ("request_id", "volume")
    plan: SyncPlan = SyncPlan.NONE

    def _payload(self):
        return [_ATTACHED.pack(self.plan)]

    @classmethod
    def _parse(cls, header, r):
        raw = r.take(_ATTACHED.size, "plan")
        (plan,) = _ATTACHED.unpack(raw)
        if any(raw[1:]):
            raise InvalidField("ATTACHED reserved bytes are not zero")
        r.end()
        try:
            return dict(plan=SyncPlan(plan))
        except ValueError as err:
            raise InvalidField(f"ATTACHED plan {plan} is not a SyncPlan "
                               f"(0..{max(SyncPlan)})") from err


@dataclass
class Detach(Message):
    """A: detach a volume.  Header: request_id, volume.  Answered by ACK."""

    TYPE = MsgType.DETACH
    HEADER_FIELDS = ("request_id", "volume")


# Data from the agent (PROTOCOL.md "Replication") -----------------------------


@dataclass
class Write(Message):
    """A: a protected write.  Header: request_id, volume, offset, length.

    Payload: the ``length`` bytes of data.  Answered by ACK once durable.
    """

    TYPE = MsgType.WRITE
    HEADER_FIELDS = _DATA_FIELDS
    data: bytes | memoryview = b""

    def __post_init__(self):
        if not self.length:
            self.length = len(self.data)

    def _payload(self):
        return [self.data] if len(self.data) else []

    @classmethod
    def _parse(cls, header, r):
        data = r.rest()
        # The header's length is authoritative: never let __post_init__
        # replace a zero or wrong length by the payload's.
        if not header.flags & FLAG_ZERO and header.length != len(data):
            raise InvalidField(f"{cls.TYPE.name} length {header.length} != payload "
                               f"length {len(data)}")
        return dict(data=data)

    def check(self):
        if self.length != len(self.data):
            raise InvalidField(f"{self.TYPE.name} length {self.length} != payload "
                               f"length {len(self.data)}")
        if self.length == 0:
            raise InvalidField(f"{self.TYPE.name} length is 0, expected 1..{MAX_DATA}")


@dataclass
class Zero(Message):
    """A: write zeroes.  Header: request_id, volume, offset, length.  No payload."""

    TYPE = MsgType.ZERO
    HEADER_FIELDS = _DATA_FIELDS

    def check(self):
        if self.length == 0:
            raise InvalidField("ZERO length is 0")


@dataclass
class Ack(Message):
    """H/A: the request ``request_id`` succeeded (for data: it is durable).  No payload."""

    TYPE = MsgType.ACK
    HEADER_FIELDS = ("request_id",)


@dataclass
class Flush(Message):
    """A: barrier.  Header: request_id.  ACKed once every earlier write is durable."""

    TYPE = MsgType.FLUSH
    HEADER_FIELDS = ("request_id",)


# Sync requested by the hub (PROTOCOL.md "Synchronisation") -------------------


@dataclass
class Read(Message):
    """H: read the protected volume.  Header: request_id, volume, offset, length."""

    TYPE = MsgType.READ
    HEADER_FIELDS = _DATA_FIELDS

    def check(self):
        if not 0 < self.length <= MAX_DATA:
            raise InvalidField(f"{self.TYPE.name} length {self.length} outside 1..{MAX_DATA}")


@dataclass
class ReadReply(Write):
    """A: answer to READ.  Header: as the READ; flag ZERO means the range
    reads as zeroes and no payload follows; otherwise the payload is the data.
    """

    TYPE = MsgType.READ_REPLY
    FLAGS = FLAG_ZERO

    def check(self):
        if self.flags & FLAG_ZERO:
            if len(self.data):
                raise InvalidField(f"{self.TYPE.name} with flag ZERO carries "
                                   f"{len(self.data)} payload bytes, expected 0")
            if not 0 < self.length <= MAX_DATA:
                raise InvalidField(f"{self.TYPE.name} length {self.length} outside 1..{MAX_DATA}")
        else:
            super().check()

    @property
    def is_zero(self) -> bool:
        return bool(self.flags & FLAG_ZERO)


@dataclass
class DirtyQuery(Message):
    """H: which regions of the volume are pending?  Header: request_id, volume."""

    TYPE = MsgType.DIRTY_QUERY
    HEADER_FIELDS = ("request_id", "volume")


_EXTENT = struct.Struct("!QQ")  # offset, length


@dataclass
class DirtyMap(Message):
    """A: the pending regions.  Header: request_id (the query's, or 0 when the
    agent reports regions it could not stream, unasked), volume.

    Payload: a sequence of (u64 offset, u64 length) extents, sorted by
    offset, non-overlapping, non-empty.  A superset of the pending regions is
    allowed; omitting one is not.
    """

    TYPE = MsgType.DIRTY_MAP
    HEADER_FIELDS = ("request_id", "volume")
    extents: list = field(default_factory=list)

    def _payload(self):
        return [b"".join(_EXTENT.pack(o, n) for o, n in self.extents)]

    @classmethod
    def _parse(cls, header, r):
        raw = r.rest()
        if len(raw) % _EXTENT.size:
            raise InvalidField(f"DIRTY_MAP payload of {len(raw)} bytes is not a "
                               f"multiple of {_EXTENT.size}")
        return dict(extents=list(_EXTENT.iter_unpack(raw)))

    def check(self):
        end = 0
        for offset, length in self.extents:
            if length == 0 or offset < end or offset + length > MAX_VOLUME_SIZE:
                raise InvalidField(f"DIRTY_MAP extent ({offset}, {length}) is empty, "
                                   "overlaps or is out of order")
            end = offset + length


_CHECKSUM_PARAMS = struct.Struct("!IB3x")  # chunk_size, algorithm


@dataclass
class ChecksumQuery(Message):
    """H: checksums of a range.  Header: request_id, volume, offset, length.

    Payload: u32 chunk_size, u8 algorithm (ChecksumAlgo), 3 bytes reserved.
    The answer holds one digest per chunk_size piece of the range (the last
    piece may be shorter).
    """

    TYPE = MsgType.CHECKSUM_QUERY
    HEADER_FIELDS = _DATA_FIELDS
    chunk_size: int = 65536
    algorithm: ChecksumAlgo = ChecksumAlgo.SHA256

    def _payload(self):
        return [_CHECKSUM_PARAMS.pack(self.chunk_size, self.algorithm)]

    @classmethod
    def _parse(cls, header, r):
        raw = r.take(_CHECKSUM_PARAMS.size, "chunk_size and algorithm")
        chunk_size, algorithm = _CHECKSUM_PARAMS.unpack(raw)
        if any(raw[5:]):
            raise InvalidField(f"{cls.TYPE.name} reserved bytes are not zero")
        try:
            algorithm = ChecksumAlgo(algorithm)
        except ValueError as err:
            raise InvalidField(f"checksum algorithm {algorithm} unknown, "
                               f"expected one of {[a.value for a in ChecksumAlgo]}") from err
        fields = dict(chunk_size=chunk_size, algorithm=algorithm)
        fields.update(cls._parse_more(header, r))
        return fields

    @classmethod
    def _parse_more(cls, header, r):
        r.end()
        return {}

    def check(self):
        check_chunk_size(self.chunk_size)
        if self.length == 0:
            raise InvalidField(f"{self.TYPE.name} length is 0")
        if self.chunk_count() * DIGEST_SIZE + _CHECKSUM_PARAMS.size > MAX_PAYLOAD:
            raise InvalidField(f"{self.TYPE.name} covers {self.chunk_count()} chunks, "
                               f"more than one answer can carry "
                               f"({(MAX_PAYLOAD - _CHECKSUM_PARAMS.size) // DIGEST_SIZE})")

    def chunk_count(self) -> int:
        return -(-self.length // self.chunk_size)


@dataclass
class Checksums(ChecksumQuery):
    """A: answer to CHECKSUM_QUERY.  Header: as the query.

    Payload: u32 chunk_size, u8 algorithm, 3 bytes reserved, then one
    32-byte digest per chunk, in order.
    """

    TYPE = MsgType.CHECKSUMS
    digests: list = field(default_factory=list)

    def _payload(self):
        return [_CHECKSUM_PARAMS.pack(self.chunk_size, self.algorithm),
                b"".join(_fixed(d, DIGEST_SIZE, "CHECKSUMS digest") for d in self.digests)]

    @classmethod
    def _parse_more(cls, header, r):
        raw = r.rest()
        if len(raw) % DIGEST_SIZE:
            raise InvalidField(f"CHECKSUMS digests of {len(raw)} bytes are not a "
                               f"multiple of {DIGEST_SIZE}")
        return dict(digests=[bytes(raw[i:i + DIGEST_SIZE])
                             for i in range(0, len(raw), DIGEST_SIZE)])

    def check(self):
        super().check()
        if len(self.digests) != self.chunk_count():
            raise InvalidField(f"CHECKSUMS carries {len(self.digests)} digests, "
                               f"expected {self.chunk_count()}")


@dataclass
class Synced(Message):
    """H: the READ_REPLY for READ ``request_id`` is durable in the replica.

    Header: request_id (the READ's), volume, offset, length.  No payload.
    The agent may now clear the range's dirty bits unless a write touched
    it after the read was taken.
    """

    TYPE = MsgType.SYNCED
    HEADER_FIELDS = _DATA_FIELDS


@dataclass
class ExtentQuery(Message):
    """H: which parts of a range read as zeroes?  (feature EXTENTS)

    Header: request_id, volume, offset, length (>= 1).  No payload.
    Answered by EXTENTS or ERROR.
    """

    TYPE = MsgType.EXTENT_QUERY
    HEADER_FIELDS = _DATA_FIELDS

    def check(self):
        if self.length == 0:
            raise InvalidField("EXTENT_QUERY length is 0")


_ALLOC_EXTENT = struct.Struct("!QI4x")  # length, flags, reserved


@dataclass
class Extents(Message):
    """A: answer to EXTENT_QUERY.  Header: as the query, unchanged.

    Payload: n >= 1 extents, each u64 length, u32 flags (EXTENT_ZERO: the
    extent reads as zeroes), 4 bytes reserved (0).  They follow each other
    from the query's offset and cover at most its length: an answer may
    describe only a prefix of the range (the hub asks again for the rest).
    """

    TYPE = MsgType.EXTENTS
    HEADER_FIELDS = _DATA_FIELDS
    extents: list = field(default_factory=list)

    def _payload(self):
        return [b"".join(_ALLOC_EXTENT.pack(n, f) for n, f in self.extents)]

    @classmethod
    def _parse(cls, header, r):
        raw = r.rest()
        if len(raw) % _ALLOC_EXTENT.size:
            raise InvalidField(f"EXTENTS payload of {len(raw)} bytes is not a "
                               f"multiple of {_ALLOC_EXTENT.size}")
        extents = []
        for i in range(0, len(raw), _ALLOC_EXTENT.size):
            if any(raw[i + 12:i + 16]):
                raise InvalidField("EXTENTS reserved bytes are not zero")
            extents.append(_ALLOC_EXTENT.unpack_from(raw, i))
        return dict(extents=extents)

    def check(self):
        if not self.extents:
            raise InvalidField("EXTENTS carries no extent")
        total = 0
        for length, flags in self.extents:
            if length == 0:
                raise InvalidField("EXTENTS extent of length 0")
            if flags & ~EXTENT_ZERO:
                raise InvalidField(f"EXTENTS extent flags 0x{flags:x} unknown "
                                   f"(allowed 0x{EXTENT_ZERO:x})")
            total += length
        if total > self.length:
            raise InvalidField(f"EXTENTS extents cover {total} bytes, more than the "
                               f"query's length {self.length}")


# Points in time -----------------------------------------------------------------


@dataclass
class Checkpoint(Message):
    """A: a named marker in the stream, covering all the agent's volumes.

    Header: request_id.  Payload: u16 name length + name.  Answered by ACK.
    """

    TYPE = MsgType.CHECKPOINT
    HEADER_FIELDS = ("request_id",)
    name: str = ""

    def _payload(self):
        return [_text(self.name, MAX_NAME, "checkpoint name")]

    @classmethod
    def _parse(cls, header, r):
        name = r.text(MAX_NAME, "checkpoint name")
        r.end()
        return dict(name=name)

    def check(self):
        validate_name(self.name, "checkpoint name")


# Recovery (PROTOCOL.md "Recovery (remote IO)") ------------------------------

_RECOVER_OPEN = struct.Struct("!B3x")  # mode


@dataclass
class RecoverOpen(Message):
    """A: open a recovery session.  Header: request_id.

    Payload: u8 mode (RecoverMode), 3 bytes reserved, u16 volume name length
    + name, u16 point length + point ("latest", a checkpoint name, or an ISO
    8601 timestamp).
    """

    TYPE = MsgType.RECOVER_OPEN
    HEADER_FIELDS = ("request_id",)
    mode: RecoverMode = RecoverMode.TEST
    name: str = ""
    point: str = "latest"

    def _payload(self):
        return [_RECOVER_OPEN.pack(self.mode), _text(self.name, MAX_NAME, "volume name"),
                _text(self.point, MAX_POINT, "point")]

    @classmethod
    def _parse(cls, header, r):
        raw = r.take(_RECOVER_OPEN.size, "mode")
        (mode,) = _RECOVER_OPEN.unpack(raw)
        if any(raw[1:]):
            raise InvalidField("RECOVER_OPEN reserved bytes are not zero")
        try:
            mode = RecoverMode(mode)
        except ValueError as err:
            raise InvalidField(f"RECOVER_OPEN mode {mode} is not a RecoverMode "
                               f"({[m.value for m in RecoverMode]})") from err
        name = r.text(MAX_NAME, "volume name")
        point = r.text(MAX_POINT, "point")
        r.end()
        return dict(mode=mode, name=name, point=point)

    def check(self):
        validate_name(self.name, "volume name")
        if not self.point:
            raise InvalidField("RECOVER_OPEN point is empty")


_RECOVER_READY = struct.Struct("!QQ")  # size, point_time_ns


@dataclass
class RecoverReady(Message):
    """H: the session is open.  Header: request_id, volume (the session id).

    Payload: u64 size, u64 point_time_ns (wall-clock time of the point, ns
    since the Unix epoch).
    """

    TYPE = MsgType.RECOVER_READY
    HEADER_FIELDS = ("request_id", "volume")
    size: int = 0
    point_time_ns: int = 0

    def _payload(self):
        return [_RECOVER_READY.pack(self.size, self.point_time_ns)]

    @classmethod
    def _parse(cls, header, r):
        size, point_time_ns = r.unpack(_RECOVER_READY, "size and point time")
        r.end()
        return dict(size=size, point_time_ns=point_time_ns)


@dataclass
class RRead(Read):
    """A: read the recovery volume.  Header: request_id, volume (session), offset, length."""

    TYPE = MsgType.RREAD


@dataclass
class RReadReply(ReadReply):
    """H: answer to RREAD; flag ZERO: the range reads as zeroes, no payload."""

    TYPE = MsgType.RREAD_REPLY


@dataclass
class RWrite(ReadReply):
    """A: write to the recovery volume; flag ZERO: write zeroes, no payload.

    Header: request_id, volume (session), offset, length.  Answered by ACK.
    """

    TYPE = MsgType.RWRITE


@dataclass
class RFlush(Message):
    """A: flush the recovery volume.  Header: request_id, volume.  Answered by ACK."""

    TYPE = MsgType.RFLUSH
    HEADER_FIELDS = ("request_id", "volume")


@dataclass
class RecoverClose(Message):
    """A: close the session.  Header: request_id, volume.  Answered by ACK."""

    TYPE = MsgType.RECOVER_CLOSE
    HEADER_FIELDS = ("request_id", "volume")


# Liveness and errors -------------------------------------------------------------

_PING = struct.Struct("!Q")       # sent_ns
_PONG = struct.Struct("!QQ")      # echo_ns, responder_ns


@dataclass
class Ping(Message):
    """H/A: are you there?  Header: request_id.  Payload: u64 sent_ns."""

    TYPE = MsgType.PING
    HEADER_FIELDS = ("request_id",)
    sent_ns: int = 0

    def _payload(self):
        return [_PING.pack(self.sent_ns)]

    @classmethod
    def _parse(cls, header, r):
        (sent_ns,) = r.unpack(_PING, "sent_ns")
        r.end()
        return dict(sent_ns=sent_ns)


@dataclass
class Pong(Message):
    """H/A: answer to PING.  Header: request_id (the PING's).

    Payload: u64 echo_ns (the PING's sent_ns), u64 responder_ns (the
    responder's wall clock: lets the pinger estimate replication lag).
    """

    TYPE = MsgType.PONG
    HEADER_FIELDS = ("request_id",)
    echo_ns: int = 0
    responder_ns: int = 0

    def _payload(self):
        return [_PONG.pack(self.echo_ns, self.responder_ns)]

    @classmethod
    def _parse(cls, header, r):
        echo_ns, responder_ns = r.unpack(_PONG, "timestamps")
        r.end()
        return dict(echo_ns=echo_ns, responder_ns=responder_ns)


_ERROR = struct.Struct("!IB")  # code, failed message type


@dataclass
class Error(Message):
    """H/A: a request failed, or the connection is about to close.

    Header: request_id (of the failed request, 0 if none).  Payload: u32 code
    (ErrorCode), u8 the failed message's type (0 if none), u16 message
    length + message (UTF-8, for humans).
    """

    TYPE = MsgType.ERROR
    HEADER_FIELDS = ("request_id",)
    code: int = ErrorCode.PROTOCOL
    failed_type: int = 0
    message: str = ""

    def _payload(self):
        return [_ERROR.pack(self.code, self.failed_type),
                _text(_clip(self.message, MAX_TEXT), MAX_TEXT, "message")]

    @classmethod
    def _parse(cls, header, r):
        code, failed_type = r.unpack(_ERROR, "code and type")
        message = r.text(MAX_TEXT, "message")
        r.end()
        return dict(code=code, failed_type=failed_type, message=message)

    @classmethod
    def from_exception(cls, err: ReplicationError) -> Error:
        text = _clip(str(err), MAX_TEXT)
        return cls(request_id=err.request_id, code=int(err.code),
                   failed_type=err.msg_type or 0, message=text)

    def code_name(self) -> str:
        try:
            return ErrorCode(self.code).name
        except ValueError:
            return str(self.code)

    def describe(self):
        return f"{super().describe()} code={self.code_name()} {self.message!r}"


_GOODBYE_CODE = struct.Struct("!B3x")  # code, 3 reserved


@dataclass
class Goodbye(Message):
    """H/A: the sender closes the connection.

    Payload: u16 length + reason (for humans), then, only on a connection
    granted feature GOODBYE_CODE, u8 code (GoodbyeCode) and 3 bytes reserved
    (0).  ``code`` None is the layout without it (before HELLO_REPLY, or
    without the feature); ``reason_code()`` is what a receiver decides on.
    """

    TYPE = MsgType.GOODBYE
    reason: str = ""
    code: GoodbyeCode | None = None

    def _payload(self):
        parts = [_text(_clip(self.reason, MAX_TEXT), MAX_TEXT, "reason")]
        if self.code is not None:
            parts.append(_GOODBYE_CODE.pack(int(self.code)))
        return parts

    @classmethod
    def _parse(cls, header, r):
        reason = r.text(MAX_TEXT, "reason")
        if r.pos == len(r.buf):
            return dict(reason=reason, code=None)
        raw = r.take(_GOODBYE_CODE.size, "code")
        r.end()
        if any(raw[1:]):
            raise InvalidField("GOODBYE reserved bytes after the code are not zero")
        try:
            code = GoodbyeCode(raw[0])
        except ValueError:
            code = raw[0]          # a later code: kept, read as UNSPECIFIED (LV-5)
        return dict(reason=reason, code=code)

    def reason_code(self) -> GoodbyeCode:
        """The code to act on: UNSPECIFIED when absent or unknown (LV-5)."""
        try:
            return GoodbyeCode(self.code or 0)
        except ValueError:
            return GoodbyeCode.UNSPECIFIED

    @classmethod
    def for_features(cls, features: int, reason: str, code: GoodbyeCode) -> Goodbye:
        """The GOODBYE for a connection granted ``features``: with ``code``
        only where GOODBYE_CODE is granted (VN-5)."""
        return cls(reason=reason, code=code if features & Feature.GOODBYE_CODE else None)

    def describe(self):
        code = "" if self.code is None else f" code={getattr(self.code, 'name', self.code)}"
        return f"{super().describe()}{code} {self.reason!r}"


# Fail-back (PROTOCOL.md "Fail-back") -------------------------------------------


@dataclass
class FailbackBegin(Message):
    """H: prepare to take PUTs into the protected volume (feature FAILBACK).

    Header: request_id, volume (attached DEMOTED).  No payload.  Answered by
    ACK once the agent can write the volume with nothing else writing it, or
    ERROR (NOT_ALLOWED, BUSY, IO_ERROR).
    """

    TYPE = MsgType.FAILBACK_BEGIN
    HEADER_FIELDS = ("request_id", "volume")


@dataclass
class Put(ReadReply):
    """H: write the hub's data into the protected volume during a fail-back.

    Header: request_id, volume, offset, length; flag ZERO: the range becomes
    zeroes, no payload.  Answered by ACK once written.
    """

    TYPE = MsgType.PUT


_FAILBACK_END = struct.Struct("!B3x")  # outcome


@dataclass
class FailbackEnd(Message):
    """H: the fail-back is over.  Header: request_id, volume.

    Payload: u8 outcome (FailbackOutcome), 3 bytes reserved (0).  Answered by
    ACK (for DONE: once the PUTs are durable, the dirty marks cleared and
    protection set up again).
    """

    TYPE = MsgType.FAILBACK_END
    HEADER_FIELDS = ("request_id", "volume")
    outcome: FailbackOutcome = FailbackOutcome.DONE

    def _payload(self):
        return [_FAILBACK_END.pack(self.outcome)]

    @classmethod
    def _parse(cls, header, r):
        raw = r.take(_FAILBACK_END.size, "outcome")
        r.end()
        if any(raw[1:]):
            raise InvalidField("FAILBACK_END reserved bytes are not zero")
        try:
            return dict(outcome=FailbackOutcome(raw[0]))
        except ValueError as err:
            raise InvalidField(f"FAILBACK_END outcome {raw[0]} is not a FailbackOutcome "
                               f"(0..{max(FailbackOutcome)})") from err


def message_class(msg_type: int) -> type[Message]:
    return _REGISTRY[msg_type]


#: Who may send what (PROTOCOL.md "Directions").
AGENT_TO_HUB = frozenset({
    MsgType.HELLO, MsgType.AUTH, MsgType.ATTACH, MsgType.DETACH, MsgType.WRITE,
    MsgType.ZERO, MsgType.FLUSH, MsgType.READ_REPLY, MsgType.DIRTY_MAP,
    MsgType.CHECKSUMS, MsgType.CHECKPOINT, MsgType.RECOVER_OPEN, MsgType.RREAD,
    MsgType.RWRITE, MsgType.RFLUSH, MsgType.RECOVER_CLOSE, MsgType.EXTENTS})
HUB_TO_AGENT = frozenset({
    MsgType.HELLO_REPLY, MsgType.AUTH_OK, MsgType.ATTACHED, MsgType.READ,
    MsgType.DIRTY_QUERY, MsgType.CHECKSUM_QUERY, MsgType.SYNCED,
    MsgType.RECOVER_READY, MsgType.RREAD_REPLY, MsgType.EXTENT_QUERY,
    MsgType.FAILBACK_BEGIN, MsgType.PUT, MsgType.FAILBACK_END})
BOTH_WAYS = frozenset({MsgType.ACK, MsgType.PING, MsgType.PONG, MsgType.ERROR,
                       MsgType.GOODBYE})

#: Never answered with ERROR, even when malformed: answering them could make
#: two peers trade ERRORs forever (PROTOCOL.md [ER-3]).
NEVER_ANSWERED = frozenset({MsgType.ERROR, MsgType.ACK, MsgType.PONG, MsgType.SYNCED,
                            MsgType.GOODBYE})


#: Each request after the handshake and the answer it gets: PROTOCOL.md
#: "Message types", column "answered by" (any request may also get an ERROR).
#: An answer whose id names an outstanding request that this type does not
#: answer answers nothing [ER-7].
ANSWERED_BY = {
    MsgType.ATTACH: MsgType.ATTACHED, MsgType.DETACH: MsgType.ACK,
    MsgType.WRITE: MsgType.ACK, MsgType.ZERO: MsgType.ACK, MsgType.FLUSH: MsgType.ACK,
    MsgType.READ: MsgType.READ_REPLY, MsgType.DIRTY_QUERY: MsgType.DIRTY_MAP,
    MsgType.CHECKSUM_QUERY: MsgType.CHECKSUMS, MsgType.EXTENT_QUERY: MsgType.EXTENTS,
    MsgType.CHECKPOINT: MsgType.ACK, MsgType.RECOVER_OPEN: MsgType.RECOVER_READY,
    MsgType.RREAD: MsgType.RREAD_REPLY, MsgType.RWRITE: MsgType.ACK,
    MsgType.RFLUSH: MsgType.ACK, MsgType.RECOVER_CLOSE: MsgType.ACK,
    MsgType.PING: MsgType.PONG, MsgType.FAILBACK_BEGIN: MsgType.ACK,
    MsgType.PUT: MsgType.ACK, MsgType.FAILBACK_END: MsgType.ACK}
#: Requests: the messages that get an answer, and so carry a non-zero
#: request_id unique among their sender's outstanding ones (PROTOCOL.md [RP-7]).
REQUESTS = frozenset(ANSWERED_BY)
#: The answers a side sends to its peer's requests (besides ERROR, which
#: also answers bad answers: look at its ``failed_type``).
ANSWERS = frozenset(ANSWERED_BY.values())


class PeerRequests:
    """The ids of the peer's requests not yet answered on one connection
    (PROTOCOL.md [RP-12]): a request whose id is still outstanding is a
    protocol error, as its answer could be taken for the earlier one's.

    No lock: the recv loop alone adds (``received``), and a sender frees an
    id just before its answer leaves (``answering``), so a peer that waited
    for the answer before using the id again always finds it free."""

    def __init__(self):
        self.ids: set[int] = set()

    def received(self, msg: Message) -> None:
        """The recv loop: note ``msg`` if it is a request; BadRequestId if one
        with its id is still outstanding."""
        if msg.TYPE not in REQUESTS:
            return
        if msg.request_id in self.ids:
            raise BadRequestId(f"{msg.TYPE.name} req={msg.request_id}: an earlier request "
                               "with that id is not answered yet (request ids must be "
                               "unique among the outstanding ones)")
        self.ids.add(msg.request_id)

    def answering(self, msg: Message) -> None:
        """Just before ``msg`` is sent: an answer (or an ERROR about a request)
        frees its request's id."""
        if msg.TYPE in ANSWERS or (msg.TYPE is MsgType.ERROR and msg.failed_type in REQUESTS):
            self.ids.discard(msg.request_id)

#: Messages that exist only on a connection whose handshake granted a feature
#: (PROTOCOL.md "Baseline", [VN-6]).
FEATURE_OF = {
    MsgType.EXTENT_QUERY: Feature.EXTENTS, MsgType.EXTENTS: Feature.EXTENTS,
    MsgType.FAILBACK_BEGIN: Feature.FAILBACK, MsgType.PUT: Feature.FAILBACK,
    MsgType.FAILBACK_END: Feature.FAILBACK}


class Side(enum.Enum):
    """Which end of a connection receives (PROTOCOL.md "Directions")."""

    AGENT = "agent"
    HUB = "hub"


def check_legal(msg_type: int, receiver: Side, features: int) -> None:
    """May ``receiver`` take a frame of this known type after AUTH_OK?

    The direction and phase step of PROTOCOL.md's check order, which comes
    right after the type and before everything else in the frame: a HELLO
    or AUTH at the hub is ``BAD_PHASE`` [HS-13]; a type its receiver never
    takes (the wrong direction, HELLO_REPLY or AUTH_OK at the agent) [ER-5],
    or one of a feature the handshake did not grant [VN-6], is ``UNSUPPORTED``.
    Raises ``RequestError``; [ER-3] still decides whether it is answered.
    """
    if receiver is Side.HUB and msg_type in (MsgType.HELLO, MsgType.AUTH):
        raise RequestError(f"{MsgType(msg_type).name} after AUTH_OK",
                           code=ErrorCode.BAD_PHASE)
    takes = AGENT_TO_HUB if receiver is Side.HUB else HUB_TO_AGENT
    if msg_type in (MsgType.HELLO, MsgType.AUTH, MsgType.HELLO_REPLY, MsgType.AUTH_OK) \
            or (msg_type not in takes and msg_type not in BOTH_WAYS):
        raise UnsupportedMessage(f"{MsgType(msg_type).name} is not a message the "
                                 f"{receiver.value} takes after AUTH_OK")
    feature = FEATURE_OF.get(msg_type)
    if feature is not None and not features & feature:
        raise UnsupportedMessage(f"{MsgType(msg_type).name} needs feature {feature.name}, "
                                 "which this connection's handshake did not grant")


def legality(receiver: Side, features: int):
    """The ``legal`` argument of ``decode_body`` for an established connection."""
    return lambda msg_type: check_legal(msg_type, receiver, features)


class VolumePhase(enum.Enum):
    """What a volume id (or a session id) is on one connection, as its
    receiver sees it (PROTOCOL.md "Volume phases")."""

    NONE = "none"                  # not attached here (a session id: not open) [VO-6]
    PROTECTED = "protected"        # attached, writes stream [VO-5, FB-7]
    PROMOTED = "promoted"          # hub: attached, then promoted elsewhere [RC-7]
    DEMOTED = "demoted"            # attached with plan DEMOTED [FB-2]
    FAILING_BACK = "failing-back"  # DEMOTED, an ACKed FAILBACK_BEGIN in force [FB-5]
    OPEN = "open"                  # a recovery session id, open


_ATTACHED_PHASES = frozenset({VolumePhase.PROTECTED, VolumePhase.PROMOTED,
                              VolumePhase.DEMOTED, VolumePhase.FAILING_BACK})
#: PROTOCOL.md "Volume phases": for each receiver, the messages naming a volume
#: (or session) it takes, the phases it takes each in, and the error for the
#: others (NONE is always NO_SUCH_VOLUME [VO-6]).  The answers to requests
#: are not here: they are matched by request id (ANSWERED_BY, [ER-7]).
VOLUME_RULES: dict[Side, dict[MsgType, tuple[frozenset, ErrorCode]]] = {
    Side.HUB: {
        MsgType.WRITE: (frozenset({VolumePhase.PROTECTED}), ErrorCode.ROLE),
        MsgType.ZERO: (frozenset({VolumePhase.PROTECTED}), ErrorCode.ROLE),
        MsgType.DETACH: (_ATTACHED_PHASES, ErrorCode.NO_SUCH_VOLUME),
        # Unsolicited only (request_id 0): the solicited one is an answer.
        MsgType.DIRTY_MAP: (frozenset({VolumePhase.PROTECTED}), ErrorCode.ROLE),
        **{t: (frozenset({VolumePhase.OPEN}), ErrorCode.NO_SUCH_VOLUME)
           for t in (MsgType.RREAD, MsgType.RWRITE, MsgType.RFLUSH, MsgType.RECOVER_CLOSE)},
    },
    Side.AGENT: {
        **{t: (_ATTACHED_PHASES - {VolumePhase.PROMOTED}, ErrorCode.NO_SUCH_VOLUME)
           for t in (MsgType.READ, MsgType.DIRTY_QUERY, MsgType.CHECKSUM_QUERY,
                     MsgType.EXTENT_QUERY)},
        MsgType.FAILBACK_BEGIN: (frozenset({VolumePhase.DEMOTED}), ErrorCode.BAD_PHASE),
        MsgType.PUT: (frozenset({VolumePhase.FAILING_BACK}), ErrorCode.BAD_PHASE),
        MsgType.FAILBACK_END: (frozenset({VolumePhase.FAILING_BACK}), ErrorCode.BAD_PHASE),
    },
}


def check_volume_phase(msg: Message, receiver: Side, phase: VolumePhase, what: str) -> None:
    """May ``receiver`` take ``msg`` for a volume (or session) in ``phase``?

    ``what`` names the volume for the error ("volume NAME", "session id N").
    Raises RequestError: NO_SUCH_VOLUME in phase NONE, else the code
    VOLUME_RULES gives; a message the table does not list is taken in any
    other phase.
    """
    taken, code = VOLUME_RULES[receiver].get(msg.TYPE, (None, None))
    if phase is VolumePhase.NONE:
        state = "open" if taken and VolumePhase.OPEN in taken else "attached"
        raise RequestError(f"{what} is not {state} on this connection",
                           code=ErrorCode.NO_SUCH_VOLUME)
    if taken is not None and phase not in taken:
        raise RequestError(f"{msg.TYPE.name} for {what}, which is {phase.value} here: taken "
                           f"only when {' or '.join(sorted(ph.value for ph in taken))}",
                           code=code)


def may_answer_with_error(err: RequestError) -> bool:
    """False for a bad frame that [ER-3] forbids answering: one of
    NEVER_ANSWERED, or an unsolicited DIRTY_MAP (request_id 0)."""
    if err.msg_type in NEVER_ANSWERED:
        return False
    return not (err.msg_type == MsgType.DIRTY_MAP and err.request_id == 0)

# ---------------------------------------------------------------------------
# Decoding


def decode_body(header: Header, payload: bytes | bytearray | memoryview,
                legal=None, crc: int | None = None) -> Message:
    """Build the message for a parsed header and its payload (no data copy).

    Checks, in PROTOCOL.md's order: payload CRC [FR-6] (``BadPayloadCRC``:
    close), then type [FR-16], then ``legal(type)`` if given (direction and
    phase: ``legality``), must-understand flags [FR-13], unused header fields
    [FR-7], a request's non-zero request_id [RP-12] (``BadRequestId``: close),
    offset + length [FR-8] and the payload layout [FR-9..12] (a
    ``RequestError`` carrying the frame's request_id and type, so the caller
    can answer ERROR and go on).  Without ``legal`` the checks are those of a
    frame its receiver takes (the vectors' "established" phase).  A WRITE's
    ``data`` is a memoryview of ``payload``: keep that buffer alive and
    unmodified while you use it.  ``crc``: the payload's CRC-32 if the caller
    has computed it (with ``crc32_pieces``), so that it is not computed twice.
    """
    payload = memoryview(payload)
    if len(payload) != header.payload_length:
        raise TruncatedFrame(f"payload is {len(payload)} bytes, header says "
                             f"{header.payload_length}")
    if crc is None:
        crc = zlib.crc32(payload)
    if crc != header.payload_crc:
        raise BadPayloadCRC(f"bad payload_crc 0x{header.payload_crc:08x}, "
                            f"computed 0x{crc:08x} over {len(payload)} bytes")
    ctx = dict(request_id=header.request_id, msg_type=header.type)
    cls = _REGISTRY.get(header.type)
    try:
        if cls is None:
            raise UnsupportedMessage(f"unknown message type 0x{header.type:02x}")
        if legal is not None:
            legal(header.type)
        unknown = header.flags & MUST_UNDERSTAND_FLAGS & ~cls.FLAGS
        if unknown:
            raise UnsupportedFlags(f"{cls.TYPE.name} has unknown must-understand "
                                   f"flags 0x{unknown:02x} (allowed 0x{cls.FLAGS:02x})")
        for name in ("volume", "offset", "length"):
            if name not in cls.HEADER_FIELDS and getattr(header, name):
                raise InvalidField(f"{cls.TYPE.name} header field {name} is "
                                   f"{getattr(header, name)}, expected 0")
        if "request_id" not in cls.HEADER_FIELDS and header.request_id:
            raise InvalidField(f"{cls.TYPE.name} header field request_id is "
                               f"{header.request_id}, expected 0")
        if cls.TYPE in REQUESTS and not header.request_id:
            raise BadRequestId(f"{cls.TYPE.name} is a request and has request_id 0 "
                               "(a request id is never 0)")
        if header.offset + header.length > MAX_VOLUME_SIZE:
            # No volume is larger, so such a range is wrong for every volume;
            # rejecting it here also keeps offset + length inside 63 bits.
            raise OutOfRange(f"offset {header.offset} + length {header.length} "
                             f"= {header.offset + header.length} exceeds "
                             f"MAX_VOLUME_SIZE {MAX_VOLUME_SIZE}")
        fields = cls._parse(header, _Reader(payload, cls.TYPE))
        msg = cls(request_id=header.request_id, volume=header.volume,
                  offset=header.offset, length=header.length, flags=header.flags,
                  **fields)
        msg.check()
        return msg
    except RequestError as err:
        err.request_id = header.request_id
        err.msg_type = header.type
        raise
    except struct.error as err:  # pragma: no cover - every layout is length-checked first
        raise InvalidField(f"malformed payload: {err}", **ctx) from err


def decode(frame: bytes | bytearray | memoryview) -> Message:
    """Decode exactly one whole frame (header + payload, nothing more)."""
    frame = memoryview(frame)
    header = parse_header(frame)
    end = HEADER_SIZE + header.payload_length
    if len(frame) < end:
        raise TruncatedFrame(f"frame is {len(frame)} bytes, header says {end}")
    if len(frame) > end:
        raise InvalidField(f"{len(frame) - end} bytes after the end of the frame")
    return decode_body(header, frame[HEADER_SIZE:end])


def encode(msg: Message) -> bytes:
    """Encode a message into one contiguous frame."""
    return msg.to_bytes()


class Decoder:
    """Incremental decoder: ``feed`` bytes as they arrive, take messages out.

    ``next_message()`` returns a message, or None when more bytes are needed.
    It raises ``ProtocolError`` (the decoder is then unusable: close) or
    ``RequestError`` (the frame was consumed: answer ERROR and call again).

    Small frames are assembled in one reusable buffer and their payload is
    copied out once.  A payload of at least ``DIRECT_PAYLOAD`` bytes that is
    not complete yet gets a buffer of its own, allocated once its header
    passed ``parse_header`` (so never over MAX_PAYLOAD); ``feed`` then copies
    arriving bytes straight into it and the message's data is a view of it.
    """

    #: Payloads this large are received into their own buffer (no second copy).
    DIRECT_PAYLOAD = 64 * 1024

    def __init__(self):
        self._buf = bytearray()
        self._pos = 0
        self._header: Header | None = None
        self._payload: bytearray | None = None  # a large payload being filled
        self._filled = 0
        self._broken: ProtocolError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        if self._payload is not None:
            n = min(len(data), len(self._payload) - self._filled)
            self._payload[self._filled:self._filled + n] = data[:n]
            self._filled += n
            data = data[n:]
            if not data:
                return
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def pending(self) -> int:
        """Bytes received but not yet part of a returned message."""
        return len(self._buf) - self._pos + self._filled

    def next_message(self) -> Message | None:
        if self._broken:
            raise self._broken
        try:
            if self._header is None:
                if len(self._buf) - self._pos < HEADER_SIZE:
                    return None
                # A 48-byte copy: no memoryview of _buf may outlive this call
                # (an exported buffer cannot be resized by feed()).
                self._header = parse_header(bytes(self._buf[self._pos:self._pos + HEADER_SIZE]))
                self._pos += HEADER_SIZE
            n = self._header.payload_length
            if self._payload is not None:
                if self._filled < n:
                    return None
                payload, self._payload, self._filled = self._payload, None, 0
            elif len(self._buf) - self._pos >= n:
                with memoryview(self._buf) as view:
                    # One copy: the message keeps its own payload, _buf is reused.
                    payload = bytes(view[self._pos:self._pos + n])
                self._pos += n
            elif n >= self.DIRECT_PAYLOAD:
                # Move what has arrived into the payload's own buffer; feed()
                # fills the rest.  _buf holds nothing else (the frame is incomplete).
                self._payload = bytearray(n)
                self._filled = len(self._buf) - self._pos
                self._payload[:self._filled] = memoryview(self._buf)[self._pos:]
                self._pos = len(self._buf)
                return None
            else:
                return None
            header, self._header = self._header, None
            return decode_body(header, payload)
        except ProtocolError as err:
            self._broken = err
            raise

    def __iter__(self) -> Iterator[Message]:
        while (msg := self.next_message()) is not None:
            yield msg

    def close(self) -> None:
        """Call at end of stream: raise TruncatedFrame if a frame was cut short."""
        if self._header is not None or self.pending():
            raise TruncatedFrame(f"stream ended inside a frame ({self.pending()} "
                                 "bytes left over)")


# ---------------------------------------------------------------------------
# Authentication (PROTOCOL.md "Handshake phase")

HUB_LABEL = b"RPL1 hub proof"
AGENT_LABEL = b"RPL1 agent proof"


def _transcript(label: bytes, agent_nonce: bytes, hub_nonce: bytes,
                agent_id: str, hub_id: str) -> bytes:
    return b"".join([label, bytes(agent_nonce), bytes(hub_nonce),
                     _text(agent_id, MAX_NAME, "agent_id"), _text(hub_id, MAX_NAME, "hub_id")])


def hub_proof(secret: bytes, agent_nonce: bytes, hub_nonce: bytes,
              agent_id: str, hub_id: str) -> bytes:
    """HMAC-SHA256(secret, HUB_LABEL | agent_nonce | hub_nonce | agent_id | hub_id)."""
    return hmac.new(secret, _transcript(HUB_LABEL, agent_nonce, hub_nonce, agent_id, hub_id),
                    hashlib.sha256).digest()


def agent_proof(secret: bytes, agent_nonce: bytes, hub_nonce: bytes,
                agent_id: str, hub_id: str) -> bytes:
    """HMAC-SHA256(secret, AGENT_LABEL | agent_nonce | hub_nonce | agent_id | hub_id)."""
    return hmac.new(secret, _transcript(AGENT_LABEL, agent_nonce, hub_nonce, agent_id, hub_id),
                    hashlib.sha256).digest()


def proof_matches(expected: bytes, received: bytes) -> bool:
    """Constant-time comparison of two proofs."""
    return hmac.compare_digest(bytes(expected), bytes(received))


def parse_secret(text: str) -> bytes:
    """A secret is written as hex (64 digits for 32 bytes); return its bytes."""
    text = text.strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError as err:
        raise ValueError("secret is not a hex string") from err
    if len(secret) < 16:
        raise ValueError(f"secret is {len(secret)} bytes, at least 16 required")
    return secret


# ---------------------------------------------------------------------------
# Vectors (tests/vectors/*.json): a loader for any implementation's harness


def message_from_fields(type_name: str, fields: dict) -> Message:
    """Build a message from a vector's "type" and "fields" (the inverse of
    ``Message.fields``)."""
    cls = _REGISTRY[MsgType[type_name]]
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in fields:
            continue
        value = fields[f.name]
        hint = str(f.type)
        if f.name in ("data", "nonce", "proof", "generation"):
            value = bytes.fromhex(value)
        elif f.name == "digests":
            value = [bytes.fromhex(d) for d in value]
        elif f.name == "extents":
            value = [tuple(e) for e in value]
        elif isinstance(value, str) and hint in _ENUM_HINTS:
            value = _ENUM_HINTS[hint][value]
        kwargs[f.name] = value
    return cls(**kwargs)


_ENUM_HINTS = {"VolumeState": VolumeState, "SyncPlan": SyncPlan,
               "ChecksumAlgo": ChecksumAlgo, "RecoverMode": RecoverMode,
               "FailbackOutcome": FailbackOutcome}


def load_vectors(path) -> list[dict]:
    """Load one vectors file: a JSON object with a "vectors" list.

    Each vector has "name", "hex" (the wire bytes) and either "type" and
    "fields" (a valid frame) or "error" (the name of the exception class the
    decoder must raise, from ``ERROR_CLASSES``) with "code" (the ErrorCode
    name), "action" ("close" or "answer") and "request_id" (of the ERROR
    answer).  This function adds "bytes" (the decoded hex) to each vector.
    The format is described in tests/vectors/README.md.
    """
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    vectors = doc["vectors"]
    for v in vectors:
        v["bytes"] = bytes.fromhex(v["hex"])
        if "error" in v and v["error"] not in ERROR_CLASSES:
            raise ValueError(f"{path}: vector {v['name']!r} names unknown error {v['error']!r}")
    return vectors


# ---------------------------------------------------------------------------
# Blocking socket shim (the only part that touches a socket; the socket is
# passed in, so this module still imports no socket code).  nbd.py keeps its
# own copy of the two loops, so that neither module depends on the other.


def recv_exactly_into(sock, view: memoryview) -> int:
    """Fill ``view`` from ``sock``; return the bytes read (short only at EOF)."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            break
        got += n
    return got


def recv_message(sock, header_buf: bytearray | None = None,
                 handshake: bool = False, legal=None) -> Message | None:
    """Read one frame from a blocking socket and decode it.

    Returns None on a clean end of stream at a frame boundary.  The payload
    is read with ``recv_into`` straight into its own buffer, which the
    message keeps (no copy), and no byte past the frame is read.  Raises as
    ``decode_body``; with ``handshake`` (before AUTH_OK) also
    ``PayloadTooLarge`` past MAX_HANDSHAKE_PAYLOAD; ``legal`` is
    ``decode_body``'s (``legality``, after AUTH_OK).
    """
    header_buf = header_buf if header_buf is not None else bytearray(HEADER_SIZE)
    got = recv_exactly_into(sock, memoryview(header_buf))
    if got == 0:
        return None
    if got < HEADER_SIZE:
        raise TruncatedFrame(f"connection closed inside a frame header ({got} of "
                             f"{HEADER_SIZE} bytes)")
    header = parse_header(header_buf)
    if handshake:
        check_handshake_header(header)
    payload = bytearray(header.payload_length)
    got = recv_exactly_into(sock, memoryview(payload))
    if got < header.payload_length:
        raise TruncatedFrame(f"connection closed inside a payload ({got} of "
                             f"{header.payload_length} bytes)")
    return decode_body(header, payload, legal)


#: A FrameReader reads its socket this much at a time.
RECV_BUFFER = 64 * 1024


class FrameReader:
    """The bytes of a blocking socket, read RECV_BUFFER at a time, for the
    frames of an established connection (a handshake must read no byte past
    its frames: ``recv_message``).  A burst of small frames (4 KiB WRITEs, a
    sparse sync's replies) then costs one recv, headers and payloads
    together; the rest of a payload at least RECV_BUFFER long is read
    straight into its own buffer.  One reader thread: the hub's recv loop,
    which parses the frames (``AgentSocket.recv_frame``), or the agent's,
    which reads them with ``recv_message`` (the reader is socket-like)."""

    def __init__(self, sock, size: int = RECV_BUFFER):
        self.sock = sock
        self.buf = memoryview(bytearray(size))
        self.start = self.end = 0           # read and not yet taken: buf[start:end]

    def buffered(self) -> bool:
        """Are bytes read from the socket waiting here (so a select would lie)?"""
        return self.start < self.end

    def read_into(self, view: memoryview) -> int:
        """Fill ``view``, from the buffer first; short only at EOF."""
        return recv_exactly_into(self, view)

    def recv_into(self, view: memoryview) -> int:
        """As a socket's: some bytes into ``view`` (0 at EOF), from the buffer,
        or when it is empty from one recv (straight into ``view`` if that is
        at least as large as the buffer).  So ``recv_message`` reads frames
        through it too."""
        if self.start == self.end:
            if len(view) >= len(self.buf):
                return self.sock.recv_into(view)
            self.start, self.end = 0, self.sock.recv_into(self.buf)
        n = min(len(view), self.end - self.start)
        view[:n] = self.buf[self.start:self.start + n]
        self.start += n
        return n


#: At most this many buffers go to one ``sendmsg`` (Linux's IOV_MAX is 1024).
SENDMSG_PARTS = 512


def send_message(sock, msg: Message, payload_crc: int | None = None) -> None:
    """Send one message with scatter/gather (``sendmsg``), no payload copy.

    TLS sockets have no ``sendmsg``; they get one ``sendall`` per part.
    The caller holds the connection's send lock.  ``payload_crc``: as
    ``Message.encode``'s.
    """
    _send_parts(sock, [memoryview(p).cast("B") for p in msg.encode(payload_crc) if len(p)])


def send_messages(sock, msgs) -> None:
    """Send ``msgs`` in order, as ``send_message`` each, but in one ``sendmsg``
    per SENDMSG_PARTS buffers: a burst of replies costs one system call, not
    one each."""
    parts = [memoryview(p).cast("B") for msg in msgs for p in msg.encode() if len(p)]
    for i in range(0, len(parts), SENDMSG_PARTS):
        _send_parts(sock, parts[i:i + SENDMSG_PARTS])


def _send_parts(sock, parts: list[memoryview]) -> None:
    while parts:
        try:
            sent = sock.sendmsg(parts)
        except NotImplementedError:  # ssl.SSLSocket
            for part in parts:
                sock.sendall(part)
            return
        while sent and parts:
            if sent >= len(parts[0]):
                sent -= len(parts[0])
                parts.pop(0)
            else:
                parts[0] = parts[0][sent:]
                sent = 0
