"""Two interchangeable codecs for the conformance suite, and the message type they share.

The suite's client and hub speak through a ``Codec``:

* ``ReferenceCodec`` wraps ``protocol.py`` (the project's reference codec);
* ``IndependentCodec`` is written only from PROTOCOL.md's tables ("Frame
  header", the per-message payload tables, "Values") and imports nothing of
  the project.  ``--independent-codec`` makes the suite use it, so the spec
  itself is checked against the reference codec.

Both turn a ``Msg`` into bytes and bytes into a ``Msg``.  A receive-side
failure is one of two exceptions, mirroring PROTOCOL.md "Two kinds of
failure":

    WireError
     +-- CloseError    a protocol error: the receiver closes [ER-1]
     +-- AnswerError   a request error: the receiver answers ERROR(code) with
                       the frame's request_id and type, and goes on [ER-2]

``HeaderCrcBlindCodec`` is a deliberately broken variant (it ignores
``header_crc``); the suite must fail it (tests/conformance/test_broken.py).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

# ---------------------------------------------------------------------------
# PROTOCOL.md "Values": frame constants, limits, codes


MAGIC = 0x52504C31
VERSION = 1
HEADER_SIZE = 48
FLAG_ZERO = 1 << 0
MUST_UNDERSTAND = 0x00FF
MAX_DATA = 33554432
MAX_PAYLOAD = 33554432
MAX_NAME = 128
MAX_POINT = 128
MAX_TEXT = 1024
MIN_CHUNK = 4096
MAX_CHUNK = 67108864
MAX_VOLUME_SIZE = (1 << 63) - 1
NONCE_SIZE = 32
DIGEST_SIZE = 32
GENERATION_SIZE = 16

#: PROTOCOL.md "Frame header": magic, version, type, flags, request_id, volume,
#: payload_length, offset, length, payload_crc, header_crc.
HEADER = struct.Struct("!IBBHQIIQQII")
HEADER_BODY = struct.Struct("!IBBHQIIQQI")

#: PROTOCOL.md "Error codes".
ERROR_CODES = {
    "UNSUPPORTED": 1, "INVALID": 2, "OUT_OF_RANGE": 3, "NO_SUCH_VOLUME": 4,
    "NOT_OWNER": 5, "BAD_NAME": 6, "AUTH_FAILED": 7, "BAD_PHASE": 8, "IO_ERROR": 9,
    "ROLE": 10, "BAD_POINT": 11, "BUSY": 12, "VERSION": 13, "INCONSISTENT": 14,
    "SHUTTING_DOWN": 15, "PROTOCOL": 16, "NOT_ALLOWED": 17,
}
CODE_NAMES = {v: k for k, v in ERROR_CODES.items()}

#: PROTOCOL.md "Enumerations".
ENUMS = {
    "state": {"CLEAN": 0, "DIRTY": 1, "UNKNOWN": 2},
    "plan": {"NONE": 0, "DIRTY": 1, "VERIFY": 2, "FULL": 3, "DEMOTED": 4},
    "algorithm": {"SHA256": 1},
    "mode": {"TEST": 1, "FAILOVER": 2},
    "outcome": {"DONE": 0, "ABORT": 1},
}
EXTENT_ZERO = 1 << 0
#: PROTOCOL.md "Feature bits".
FEATURES = {"EXTENTS": 1 << 0, "FAILBACK": 1 << 1, "GOODBYE_CODE": 1 << 2}

# PROTOCOL.md "Message types": value, direction, header fields used, flags
# allowed, payload layout.  Layout items:
#   ("u8"|"u16"|"u32"|"u64", field)   an unsigned big-endian integer
#   ("enum", field, width)             an integer that must be in ENUMS[field]
#   ("reserved", n)                    n zero bytes
#   ("fixed", field, n)                bytes[n]
#   ("name"|"text"|"point", field)     a string: a name, a MAX_TEXT text, a point
#   ("data", field)                    the rest of the payload (length rules apply)
#   ("extents", field)                 n x (u64 offset, u64 length)
#   ("allocs", field)                  n x (u64 length, u32 flags, 4 reserved)
#   ("digests", field)                 n x bytes[32]
#   ("optcode", field)                 nothing, or u8 + 3 reserved (GOODBYE code:
#                                      absent = None; any value is accepted)
R, V, O, L = "request_id", "volume", "offset", "length"
ID_FIELDS = (R, V, O, L)
_CSUM = [("u32", "chunk_size"), ("enum", "algorithm", 1), ("reserved", 3)]
TYPES: dict[str, tuple[int, str, tuple, int, list]] = {
    "HELLO": (0x01, "A", (), 0, [("u8", "min_version"), ("u8", "max_version"),
                                 ("reserved", 2), ("u32", "features"),
                                 ("fixed", "nonce", NONCE_SIZE), ("name", "agent_id")]),
    "HELLO_REPLY": (0x02, "H", (), 0, [("u8", "version"), ("reserved", 1), ("reserved", 2),
                                       ("u32", "features"), ("fixed", "nonce", NONCE_SIZE),
                                       ("fixed", "proof", DIGEST_SIZE), ("hubid", "hub_id")]),
    "AUTH": (0x03, "A", (), 0, [("fixed", "proof", DIGEST_SIZE)]),
    "AUTH_OK": (0x04, "H", (), 0, []),
    "ATTACH": (0x10, "A", (R,), 0, [("u64", "size"), ("u32", "chunk_size"),
                                    ("enum", "state", 1), ("reserved", 1),
                                    ("fixed", "generation", GENERATION_SIZE),
                                    ("name", "name")]),
    "ATTACHED": (0x11, "H", (R, V), 0, [("enum", "plan", 1), ("reserved", 3)]),
    "DETACH": (0x12, "A", (R, V), 0, []),
    "WRITE": (0x20, "A", ID_FIELDS, 0, [("data", "data")]),
    "ZERO": (0x21, "A", ID_FIELDS, 0, []),
    "ACK": (0x22, "AH", (R,), 0, []),
    "FLUSH": (0x23, "A", (R,), 0, []),
    "READ": (0x30, "H", ID_FIELDS, 0, []),
    "READ_REPLY": (0x31, "A", ID_FIELDS, FLAG_ZERO, [("data", "data")]),
    "DIRTY_QUERY": (0x32, "H", (R, V), 0, []),
    "DIRTY_MAP": (0x33, "A", (R, V), 0, [("extents", "extents")]),
    "CHECKSUM_QUERY": (0x34, "H", ID_FIELDS, 0, list(_CSUM)),
    "CHECKSUMS": (0x35, "A", ID_FIELDS, 0, [*_CSUM, ("digests", "digests")]),
    "SYNCED": (0x36, "H", ID_FIELDS, 0, []),
    "EXTENT_QUERY": (0x37, "H", ID_FIELDS, 0, []),
    "EXTENTS": (0x38, "A", ID_FIELDS, 0, [("allocs", "extents")]),
    "CHECKPOINT": (0x40, "A", (R,), 0, [("name", "name")]),
    "RECOVER_OPEN": (0x50, "A", (R,), 0, [("enum", "mode", 1), ("reserved", 3),
                                          ("name", "name"), ("point", "point")]),
    "RECOVER_READY": (0x51, "H", (R, V), 0, [("u64", "size"), ("u64", "point_time_ns")]),
    "RREAD": (0x52, "A", ID_FIELDS, 0, []),
    "RREAD_REPLY": (0x53, "H", ID_FIELDS, FLAG_ZERO, [("data", "data")]),
    "RWRITE": (0x54, "A", ID_FIELDS, FLAG_ZERO, [("data", "data")]),
    "RFLUSH": (0x55, "A", (R, V), 0, []),
    "RECOVER_CLOSE": (0x56, "A", (R, V), 0, []),
    "PING": (0x60, "AH", (R,), 0, [("u64", "sent_ns")]),
    "PONG": (0x61, "AH", (R,), 0, [("u64", "echo_ns"), ("u64", "responder_ns")]),
    "ERROR": (0x62, "AH", (R,), 0, [("u32", "code"), ("u8", "failed_type"),
                                    ("text", "message")]),
    "GOODBYE": (0x63, "AH", (), 0, [("text", "reason"), ("optcode", "code")]),
    "FAILBACK_BEGIN": (0x70, "H", (R, V), 0, []),
    "PUT": (0x71, "H", ID_FIELDS, FLAG_ZERO, [("data", "data")]),
    "FAILBACK_END": (0x72, "H", (R, V), 0, [("enum", "outcome", 1), ("reserved", 3)]),
}
TYPE_VALUES = {name: spec[0] for name, spec in TYPES.items()}
TYPE_NAMES = {spec[0]: name for name, spec in TYPES.items()}
#: Messages never answered with ERROR, even malformed [ER-3] (DIRTY_MAP only when unsolicited).
NEVER_ANSWERED = frozenset({"ERROR", "ACK", "PONG", "SYNCED", "GOODBYE"})
#: PROTOCOL.md "Message types", column "answered by": the requests, whose
#: request_id is never 0 [RP-7, RP-12].
REQUEST_TYPES = frozenset({
    "ATTACH", "DETACH", "WRITE", "ZERO", "FLUSH", "READ", "DIRTY_QUERY", "CHECKSUM_QUERY",
    "EXTENT_QUERY", "CHECKPOINT", "RECOVER_OPEN", "RREAD", "RWRITE", "RFLUSH",
    "RECOVER_CLOSE", "PING", "FAILBACK_BEGIN", "PUT", "FAILBACK_END"})
#: PROTOCOL.md "Feature bits": the messages of a feature [VN-6].
FEATURE_TYPES = {"EXTENT_QUERY": "EXTENTS", "EXTENTS": "EXTENTS", "FAILBACK_BEGIN": "FAILBACK",
                 "PUT": "FAILBACK", "FAILBACK_END": "FAILBACK"}
#: PROTOCOL.md "Volume phases": per receiver ("H" hub, "A" agent), each message
#: that names a volume (or session), the phases that take it, and the error in
#: the others (``none`` is NO_SUCH_VOLUME whatever this says [VO-6]).  The hub's
#: DIRTY_MAP row is the unsolicited one (request_id 0), never answered [ER-3].
_ATTACHED_PHASES = frozenset({"protected", "promoted", "demoted", "failing-back"})
VOLUME_PHASES = {
    "H": {"WRITE": (frozenset({"protected"}), "ROLE"),
          "ZERO": (frozenset({"protected"}), "ROLE"),
          "DETACH": (_ATTACHED_PHASES, "NO_SUCH_VOLUME"),
          "DIRTY_MAP": (frozenset({"protected"}), "ROLE"),
          **{t: (frozenset({"open"}), "NO_SUCH_VOLUME")
             for t in ("RREAD", "RWRITE", "RFLUSH", "RECOVER_CLOSE")}},
    "A": {**{t: (_ATTACHED_PHASES - {"promoted"}, "NO_SUCH_VOLUME")
             for t in ("READ", "DIRTY_QUERY", "CHECKSUM_QUERY", "EXTENT_QUERY")},
          "FAILBACK_BEGIN": (frozenset({"demoted"}), "BAD_PHASE"),
          "PUT": (frozenset({"failing-back"}), "BAD_PHASE"),
          "FAILBACK_END": (frozenset({"failing-back"}), "BAD_PHASE")},
}
#: A request of each type in VOLUME_PHASES naming volume (or session) ``vid``:
#: well formed, so that only its volume's phase decides the answer.
PHASE_PROBES = {
    "WRITE": lambda vid: msg("WRITE", volume=vid, offset=0, data=b"p" * 512),
    "ZERO": lambda vid: msg("ZERO", volume=vid, offset=0, length=4096),
    "DETACH": lambda vid: msg("DETACH", volume=vid),
    "RREAD": lambda vid: msg("RREAD", volume=vid, offset=0, length=4096),
    "RWRITE": lambda vid: msg("RWRITE", volume=vid, offset=0, data=b"p" * 512),
    "RFLUSH": lambda vid: msg("RFLUSH", volume=vid),
    "RECOVER_CLOSE": lambda vid: msg("RECOVER_CLOSE", volume=vid),
    "READ": lambda vid: msg("READ", volume=vid, offset=0, length=4096),
    "DIRTY_QUERY": lambda vid: msg("DIRTY_QUERY", volume=vid),
    "CHECKSUM_QUERY": lambda vid: msg("CHECKSUM_QUERY", volume=vid, offset=0, length=65536,
                                      chunk_size=65536, algorithm=1),
    "EXTENT_QUERY": lambda vid: msg("EXTENT_QUERY", volume=vid, offset=0, length=65536),
    "FAILBACK_BEGIN": lambda vid: msg("FAILBACK_BEGIN", volume=vid),
    "PUT": lambda vid: msg("PUT", volume=vid, offset=0, data=b"p" * 512),
    "FAILBACK_END": lambda vid: msg("FAILBACK_END", volume=vid, outcome="ABORT"),
}
#: PROTOCOL.md "Connection phases": what the handshake allows [HS-11].
HANDSHAKE_TYPES = frozenset({"HELLO", "HELLO_REPLY", "AUTH", "AUTH_OK", "ERROR", "GOODBYE"})


def established_outcome(vector: dict, receiver: str, features: int) -> tuple[str, str]:
    """(action, code) for a malformed vector received after AUTH_OK by ``receiver``
    ("A": the agent, "H": the hub) on a connection granted ``features``.

    PROTOCOL.md's check order puts direction and phase right after the type:
    a known type the receiver does not take then (the wrong direction [ER-5],
    a handshake message [HS-13], a feature not granted [VN-6]) is answered
    UNSUPPORTED (BAD_PHASE for HELLO and AUTH at the hub) whatever else is
    wrong in it, and dropped if it is a type [ER-3] never answers."""
    raw = bytes.fromhex(vector["hex"])
    name = TYPE_NAMES.get(raw[5]) if len(raw) > 5 else None
    if vector["phase"] == "any" or name is None:
        return vector["action"], vector["code"]
    sender = "A" if receiver == "H" else "H"
    feature = FEATURE_TYPES.get(name)
    if receiver == "H" and name in ("HELLO", "AUTH"):
        code = "BAD_PHASE"
    elif (sender not in TYPES[name][1] or name in HANDSHAKE_TYPES - {"ERROR", "GOODBYE"}
          or feature is not None and not features & FEATURES[feature]):
        code = "UNSUPPORTED"
    else:
        return vector["action"], vector["code"]
    return ("drop" if name in NEVER_ANSWERED else "answer"), code

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_INTS = {"u8": struct.Struct("!B"), "u16": struct.Struct("!H"),
         "u32": struct.Struct("!I"), "u64": struct.Struct("!Q")}
_ENUM_WIDTH = {1: _INTS["u8"]}
_EXTENT = struct.Struct("!QQ")
_ALLOC = struct.Struct("!QI4x")


# ---------------------------------------------------------------------------
# Messages and errors


@dataclass
class Msg:
    """One decoded (or to be encoded) message: a type name, the five header
    fields and the payload fields by their PROTOCOL.md names."""

    type: str
    request_id: int = 0
    volume: int = 0
    offset: int = 0
    length: int = 0
    flags: int = 0
    fields: dict = None

    def __post_init__(self):
        if self.fields is None:
            self.fields = {}

    def __getattr__(self, name):
        fields = self.__dict__.get("fields") or {}
        if name in fields:
            return fields[name]
        raise AttributeError(f"{self.__dict__.get('type')} has no field {name!r}")

    def describe(self) -> str:
        bits = [self.type, f"req={self.request_id}"]
        if self.volume:
            bits.append(f"vol={self.volume}")
        if self.offset or self.length:
            bits.append(f"off={self.offset} len={self.length}")
        if self.type == "ERROR":
            bits.append(f"code={CODE_NAMES.get(self.fields.get('code'), self.fields.get('code'))}"
                        f" {self.fields.get('message', '')!r}")
        return " ".join(bits)


def msg(type_name: str, **kw) -> Msg:
    """``msg("WRITE", request_id=1, volume=2, offset=0, data=b"x")``; length
    defaults to len(data) for data-carrying messages without FLAG_ZERO."""
    header = {k: kw.pop(k) for k in ("request_id", "volume", "offset", "length", "flags")
              if k in kw}
    if "data" in kw and "length" not in header and not header.get("flags", 0) & FLAG_ZERO:
        header["length"] = len(kw["data"])
    return Msg(type_name, **header, fields=kw)


class WireError(Exception):
    """A frame the receiver must reject."""

    action = "?"

    def __init__(self, reason: str, code: str = "PROTOCOL", request_id: int = 0,
                 msg_type: int = 0):
        super().__init__(reason)
        self.code = code
        self.request_id = request_id
        self.msg_type = msg_type


class CloseError(WireError):
    """A protocol error: close the connection [ER-1]."""

    action = "close"


class AnswerError(WireError):
    """A request error: answer ERROR(code) with the frame's request id, go on [ER-2]."""

    action = "answer"


# ---------------------------------------------------------------------------
# Raw frames (also used to craft malformed ones)


def raw_frame(type_value: int, payload: bytes = b"", *, flags: int = 0, request_id: int = 0,
              volume: int = 0, offset: int = 0, length: int = 0, magic: int = MAGIC,
              version: int = VERSION, payload_length: int | None = None,
              payload_crc: int | None = None, header_crc: int | None = None) -> bytes:
    """Build one frame field by field; every CRC and length may be overridden."""
    plen = len(payload) if payload_length is None else payload_length
    pcrc = zlib.crc32(payload) if payload_crc is None else payload_crc
    body = HEADER_BODY.pack(magic, version, type_value, flags, request_id, volume, plen,
                            offset, length, pcrc)
    hcrc = zlib.crc32(body) if header_crc is None else header_crc
    return body + struct.pack("!I", hcrc) + bytes(payload)


# ---------------------------------------------------------------------------
# The independent codec


class IndependentCodec:
    """PROTOCOL.md's tables, executed.  Imports nothing of the project."""

    name = "independent"
    check_header_crc = True

    # -- encoding -----------------------------------------------------------

    def encode(self, m: Msg) -> bytes:
        value, _, _, _, layout = TYPES[m.type]
        parts = []
        for item in layout:
            kind = item[0]
            if kind in _INTS:
                parts.append(_INTS[kind].pack(int(m.fields.get(item[1], 0))))
            elif kind == "enum":
                raw = m.fields.get(item[1], 0)
                if isinstance(raw, str):
                    raw = ENUMS[item[1]][raw]
                parts.append(_ENUM_WIDTH[item[2]].pack(int(raw)))
            elif kind == "reserved":
                parts.append(bytes(item[1]))
            elif kind == "fixed":
                raw = bytes(m.fields.get(item[1], bytes(item[2])))
                if len(raw) != item[2]:
                    raise ValueError(f"{m.type} {item[1]} is {len(raw)} bytes, expected "
                                     f"{item[2]} [FR-15]")
                parts.append(raw)
            elif kind in ("name", "text", "point", "hubid"):
                raw = str(m.fields.get(item[1], "")).encode("utf-8")
                parts.append(struct.pack("!H", len(raw)) + raw)
            elif kind == "data":
                parts.append(bytes(m.fields.get(item[1], b"")))
            elif kind == "extents":
                parts.append(b"".join(_EXTENT.pack(o, n) for o, n in m.fields.get(item[1], [])))
            elif kind == "allocs":
                parts.append(b"".join(_ALLOC.pack(n, fl) for n, fl in m.fields.get(item[1], [])))
            elif kind == "digests":
                parts.append(b"".join(bytes(d) for d in m.fields.get(item[1], [])))
            elif kind == "optcode" and m.fields.get(item[1]) is not None:
                parts.append(struct.pack("!B3x", int(m.fields[item[1]])))
        payload = b"".join(parts)
        return raw_frame(value, payload, flags=m.flags, request_id=m.request_id,
                         volume=m.volume, offset=m.offset, length=m.length)

    # -- decoding -----------------------------------------------------------

    def parse_header(self, buf: bytes) -> tuple:
        """The four checks before the payload is read [FR-2..FR-5]; all close."""
        (magic, version, mtype, flags, req, vol, plen, off, length, pcrc,
         hcrc) = HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise CloseError(f"magic 0x{magic:08x}, expected 0x{MAGIC:08x} [FR-2]")
        if version != VERSION:
            raise CloseError(f"version {version}, expected {VERSION} [FR-3]")
        if self.check_header_crc and hcrc != zlib.crc32(bytes(buf[:HEADER_SIZE - 4])):
            raise CloseError("header_crc mismatch [FR-4]")
        if plen > MAX_PAYLOAD:
            raise CloseError(f"payload_length {plen} > MAX_PAYLOAD [FR-5]")
        return mtype, flags, req, vol, plen, off, length, pcrc

    def decode_body(self, header: tuple, payload: bytes) -> Msg:
        mtype, flags, req, vol, plen, off, length, pcrc = header
        if zlib.crc32(payload) != pcrc:
            raise CloseError("payload_crc mismatch [FR-6]")
        ctx = dict(request_id=req, msg_type=mtype)
        name = TYPE_NAMES.get(mtype)
        if name is None:
            raise AnswerError(f"unknown type 0x{mtype:02x} [FR-16]", "UNSUPPORTED", **ctx)
        _, _, used, allowed, layout = TYPES[name]
        if flags & MUST_UNDERSTAND & ~allowed:
            raise AnswerError(f"{name} flags 0x{flags:04x} [FR-13]", "UNSUPPORTED", **ctx)
        for fname, value in zip(ID_FIELDS, (req, vol, off, length)):
            if fname not in used and value:
                raise AnswerError(f"{name} unused {fname} = {value} [FR-7]", "INVALID", **ctx)
        if name in REQUEST_TYPES and not req:
            raise CloseError(f"{name} is a request with request_id 0 [RP-12]")
        if off + length > MAX_VOLUME_SIZE:
            raise AnswerError(f"offset + length = {off + length} [FR-8]", "OUT_OF_RANGE", **ctx)
        m = Msg(name, req, vol, off, length, flags)
        self._payload(m, layout, bytes(payload), ctx)
        self._semantics(m, ctx)
        return m

    def _payload(self, m: Msg, layout: list, buf: bytes, ctx: dict) -> None:
        pos = 0

        def take(n: int, what: str) -> bytes:
            nonlocal pos
            if pos + n > len(buf):
                raise AnswerError(f"{m.type} payload ends inside {what} [FR-9]", "INVALID", **ctx)
            pos += n
            return buf[pos - n:pos]

        names = []
        for item in layout:
            kind = item[0]
            if kind in _INTS:
                m.fields[item[1]] = _INTS[kind].unpack(take(_INTS[kind].size, item[1]))[0]
            elif kind == "enum":
                value = _ENUM_WIDTH[item[2]].unpack(take(item[2], item[1]))[0]
                if value not in ENUMS[item[1]].values():
                    raise AnswerError(f"{m.type} {item[1]} {value} not in the enumeration",
                                      "INVALID", **ctx)
                m.fields[item[1]] = value
            elif kind == "reserved":
                if any(take(item[1], "reserved")):
                    raise AnswerError(f"{m.type} reserved bytes not zero [FR-12]", "INVALID", **ctx)
            elif kind == "fixed":
                m.fields[item[1]] = take(item[2], item[1])
            elif kind in ("name", "text", "point", "hubid"):
                (n,) = struct.unpack("!H", take(2, item[1] + " length"))
                limit = MAX_TEXT if kind == "text" else MAX_NAME
                if n > limit:
                    raise AnswerError(f"{m.type} {item[1]} of {n} bytes > {limit} [FR-10]",
                                      "INVALID", **ctx)
                try:
                    m.fields[item[1]] = take(n, item[1]).decode("utf-8")
                except UnicodeDecodeError:
                    raise AnswerError(f"{m.type} {item[1]} not UTF-8 [FR-10]", "INVALID",
                                      **ctx) from None
                if kind == "name":
                    names.append(item[1])
            elif kind == "data":
                m.fields[item[1]] = buf[pos:]
                pos = len(buf)
            elif kind == "extents":
                rest = buf[pos:]
                pos = len(buf)
                if len(rest) % 16:
                    raise AnswerError("DIRTY_MAP payload not a multiple of 16 [FR-9]",
                                      "INVALID", **ctx)
                m.fields[item[1]] = list(_EXTENT.iter_unpack(rest))
            elif kind == "allocs":
                rest = buf[pos:]
                pos = len(buf)
                if len(rest) % 16:
                    raise AnswerError("EXTENTS payload not a multiple of 16 [FR-9]",
                                      "INVALID", **ctx)
                if any(rest[i + 12:i + 16] != bytes(4) for i in range(0, len(rest), 16)):
                    raise AnswerError("EXTENTS reserved bytes not zero [FR-12]", "INVALID", **ctx)
                m.fields[item[1]] = [_ALLOC.unpack_from(rest, i) for i in range(0, len(rest), 16)]
            elif kind == "digests":
                rest = buf[pos:]
                pos = len(buf)
                if len(rest) % DIGEST_SIZE:
                    raise AnswerError("CHECKSUMS digests ragged [FR-9]", "INVALID", **ctx)
                m.fields[item[1]] = [rest[i:i + 32] for i in range(0, len(rest), 32)]
            elif kind == "optcode":
                m.fields[item[1]] = None
                if pos < len(buf):
                    raw = take(4, item[1])
                    if any(raw[1:]):
                        raise AnswerError(f"{m.type} reserved bytes not zero [FR-12]",
                                          "INVALID", **ctx)
                    m.fields[item[1]] = raw[0]
        if pos != len(buf):
            raise AnswerError(f"{m.type} has {len(buf) - pos} trailing bytes [FR-9]",
                              "INVALID", **ctx)
        m.fields["_names"] = names

    def _semantics(self, m: Msg, ctx: dict) -> None:
        """Per-message value rules from the message sections of PROTOCOL.md."""
        f = m.fields
        names = f.pop("_names")

        def invalid(why):
            raise AnswerError(f"{m.type}: {why}", "INVALID", **ctx)

        if m.type == "HELLO" and f["min_version"] > f["max_version"]:
            invalid("min_version > max_version")
        for fname in names:
            value = f[fname]
            if not (value and len(value.encode()) <= MAX_NAME and NAME_RE.fullmatch(value)):
                raise AnswerError(f"{m.type} {fname} {value!r} is not a name [FR-11]",
                                  "BAD_NAME", **ctx)
        chunk = f.get("chunk_size")
        if chunk is not None and not (MIN_CHUNK <= chunk <= MAX_CHUNK and chunk & (chunk - 1) == 0):
            invalid(f"chunk_size {chunk}")
        if m.type == "ATTACH" and not 0 < f["size"] <= MAX_VOLUME_SIZE:
            invalid(f"size {f['size']}")
        if m.type == "WRITE" and not (m.length == len(f["data"]) and 0 < m.length <= MAX_DATA):
            invalid("length != payload_length or outside 1..MAX_DATA [RP-9]")
        if m.type in ("READ_REPLY", "RREAD_REPLY", "RWRITE", "PUT"):
            if m.flags & FLAG_ZERO:
                if f["data"] or not 0 < m.length <= MAX_DATA:
                    invalid("FLAG_ZERO with a payload or a bad length [SY-6]")
            elif not (m.length == len(f["data"]) and 0 < m.length <= MAX_DATA):
                invalid("length != payload_length [RP-9]")
        if m.type in ("READ", "RREAD") and not 0 < m.length <= MAX_DATA:
            invalid("length outside 1..MAX_DATA")
        if m.type in ("ZERO", "CHECKSUM_QUERY", "CHECKSUMS", "EXTENT_QUERY") and m.length == 0:
            invalid("length 0")
        if m.type in ("CHECKSUM_QUERY", "CHECKSUMS"):
            pieces = -(-m.length // chunk)
            if 8 + 32 * pieces > MAX_PAYLOAD:
                invalid("answer would exceed MAX_PAYLOAD [SY-10]")
            if m.type == "CHECKSUMS" and len(f["digests"]) != pieces:
                invalid(f"{len(f['digests'])} digests for {pieces} pieces [SY-11]")
        if m.type == "DIRTY_MAP":
            end = 0
            for off, n in f["extents"]:
                if n == 0 or off < end or off + n > MAX_VOLUME_SIZE:
                    invalid("extents unsorted, overlapping or empty [SY-7]")
                end = off + n
        if m.type == "EXTENTS":
            if not f["extents"]:
                invalid("no extent [SY-17]")
            if any(n == 0 or fl & ~EXTENT_ZERO for n, fl in f["extents"]):
                invalid("an extent of length 0 or with an unknown flag [SY-17]")
            if sum(n for n, _ in f["extents"]) > m.length:
                invalid("extents cover more than the query [SY-17]")
        if m.type == "RECOVER_OPEN" and not f["point"]:
            invalid("empty point")


class HeaderCrcBlindCodec(IndependentCodec):
    """BROKEN ON PURPOSE: never checks header_crc.  The suite must fail it."""

    name = "broken-header-crc"
    check_header_crc = False


# ---------------------------------------------------------------------------
# The reference codec behind the same interface


class ReferenceCodec:
    """protocol.py, adapted to ``Msg`` and ``WireError``."""

    name = "reference"

    def __init__(self):
        import protocol
        self.p = protocol

    def _to_ref(self, m: Msg):
        cls = self.p.message_class(self.p.MsgType[m.type])
        kw = dict(request_id=m.request_id, volume=m.volume, offset=m.offset,
                  length=m.length, flags=m.flags)
        for k, v in m.fields.items():
            if isinstance(v, str) and k in ENUMS:
                v = ENUMS[k][v]
            if k == "extents":
                v = [tuple(e) for e in v]
            kw[k] = v
        return cls(**kw)

    def encode(self, m: Msg) -> bytes:
        return self.p.encode(self._to_ref(m))

    def parse_header(self, buf: bytes):
        try:
            return self.p.parse_header(bytes(buf[:HEADER_SIZE]))
        except self.p.ReplicationError as err:
            raise CloseError(str(err)) from err

    def decode_body(self, header, payload: bytes) -> Msg:
        try:
            ref = self.p.decode_body(header, payload)
        except self.p.ProtocolError as err:
            raise CloseError(str(err)) from err
        except self.p.RequestError as err:
            raise AnswerError(str(err), self.p.ErrorCode(err.code).name,
                              err.request_id, err.msg_type or 0) from err
        fields = {}
        import dataclasses
        for fdef in dataclasses.fields(ref):
            if fdef.name in ("request_id", "volume", "offset", "length", "flags"):
                continue
            value = getattr(ref, fdef.name)
            if isinstance(value, memoryview):
                value = bytes(value)
            elif isinstance(value, int):
                value = int(value)
            fields[fdef.name] = value
        return Msg(ref.TYPE.name, ref.request_id, ref.volume, ref.offset, ref.length,
                   ref.flags, fields)


CODECS = {"reference": ReferenceCodec, "independent": IndependentCodec,
          "broken-header-crc": HeaderCrcBlindCodec}


def make_codec(name: str):
    try:
        return CODECS[name]()
    except KeyError:
        raise ValueError(f"codec {name!r}, expected one of {sorted(CODECS)}") from None


def decode_frame(codec, frame: bytes) -> Msg:
    """Decode exactly one whole frame; a short frame is a protocol error."""
    if len(frame) < HEADER_SIZE:
        raise CloseError(f"stream ended inside a header ({len(frame)} bytes)")
    header = codec.parse_header(frame[:HEADER_SIZE])
    plen = header[4] if isinstance(header, tuple) else header.payload_length
    if len(frame) < HEADER_SIZE + plen:
        raise CloseError("stream ended inside a payload")
    if len(frame) > HEADER_SIZE + plen:
        raise CloseError(f"{len(frame) - HEADER_SIZE - plen} bytes after the frame")
    return codec.decode_body(header, frame[HEADER_SIZE:HEADER_SIZE + plen])


def header_payload_length(header) -> int:
    return header[4] if isinstance(header, tuple) else header.payload_length


def vector_clauses(vector: dict) -> tuple[str, ...]:
    """The PROTOCOL.md clauses a malformed vector exercises (for the clause table)."""
    by_error = {"BadMagic": "FR-2", "BadVersion": "FR-3", "BadHeaderCRC": "FR-4",
                "PayloadTooLarge": "FR-5", "BadPayloadCRC": "FR-6", "TruncatedFrame": "ER-1",
                "UnsupportedMessage": "FR-16", "UnsupportedFlags": "FR-13",
                "OutOfRange": "FR-8", "BadRequestId": "RP-12"}
    name = vector["name"]
    ids = {by_error.get(vector["error"], "FR-9")}
    if vector["code"] == "BAD_NAME":
        ids = {"FR-11"}
    elif vector["error"] == "InvalidField":
        if "unused" in name:
            ids = {"FR-7"}
        elif "reserved" in name:
            ids = {"FR-12"}
        elif "utf8" in name or "too_long" in name and "name" in name or "text_too_long" in name:
            ids = {"FR-10"}
        elif "zero_too_long" in name:
            ids = {"FR-18"}
        elif name.startswith("write_") or "length_mismatch" in name:
            ids = {"RP-9"}
        elif name.startswith("dirty_map"):
            ids = {"SY-7"}
        elif name.startswith("checksums_wrong"):
            ids = {"SY-11"}
        elif "too_many_chunks" in name:
            ids = {"SY-10"}
        elif "read_reply_zero" in name:
            ids = {"SY-6"}
    ids.add({"close": "ER-1", "answer": "ER-2", "drop": "ER-3"}[vector["action"]])
    return tuple(sorted(ids))
