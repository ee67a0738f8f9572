#!/usr/bin/env python3
"""Generate the golden vectors in tests/vectors/*.json from protocol.py.

    python3 tests/vectors/generate.py          # rewrite the JSON files
    python3 tests/vectors/generate.py --check  # exit 1 if they are stale

Every vector is produced by the codec and then checked against it: a valid
frame must decode back to its fields, a malformed frame must raise exactly
the error class named in the vector.  A vector that does not behave as
described stops the generator, so the corpus cannot drift from the codec.
The JSON format is described in tests/vectors/README.md.
"""

from __future__ import annotations

import json
import pathlib
import struct
import sys
import zlib

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

import protocol as p  # noqa: E402

FORMAT = "repagent-vectors/1"

# ---------------------------------------------------------------------------
# Fixed inputs: nothing here is random, so the files are reproducible.

SECRET = bytes(range(0x00, 0x20))
AGENT_ID = "agent-1"
HUB_ID = "hub-1"
NONCE_A = bytes(range(0xA0, 0xC0))
NONCE_H = bytes(range(0xC0, 0xE0))
GENERATION = bytes.fromhex("0123456789abcdef0123456789abcdef")
DATA = b"RPL1 data " * 4 + b"\x00\xff\x7f\x80"  # 44 bytes, not 4-aligned on purpose
SHA_A = bytes.fromhex("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
SHA_B = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


def valid_messages() -> list[tuple[str, str, p.Message]]:
    """(name, description, message): at least one per message type."""
    hs = handshake_messages()
    m = [
        ("hello", "A: first frame, versions 1..1, no features", hs[0][2]),
        ("hello_reply", "H: version 1, hub nonce and hub proof", hs[1][2]),
        ("auth", "A: agent proof", hs[2][2]),
        ("auth_ok", "H: the connection is established", hs[3][2]),
        ("hello_future_versions", "A: an agent that speaks versions 1..3 and offers "
         "feature bits a v1 hub does not know",
         p.Hello(min_version=1, max_version=3, features=0x80000001, nonce=NONCE_A,
                 agent_id="agent.b_2")),
    ]
    for state in p.VolumeState:
        m.append((f"attach_{state.name.lower()}", f"A: ATTACH with state {state.name}",
                  p.Attach(request_id=1 + state, size=1 << 30, chunk_size=65536,
                           state=state, generation=GENERATION, name="disk0")))
    for plan in p.SyncPlan:
        m.append((f"attached_{plan.name.lower()}", f"H: ATTACHED with plan {plan.name}",
                  p.Attached(request_id=1, volume=7, plan=plan)))
    m += [
        ("detach", "A: DETACH volume 7", p.Detach(request_id=9, volume=7)),
        ("write", "A: 44 bytes at offset 4096",
         p.Write(request_id=0x0102030405060708, volume=7, offset=4096, data=DATA)),
        ("write_ignorable_flag", "A: WRITE with flag bit 8 set: bits 8-15 are "
         "ignorable, the frame is valid and the flag is kept",
         p.Write(request_id=11, volume=7, offset=0, data=b"\x01", flags=0x0100)),
        ("write_max_offset", "A: a 1-byte write ending exactly at MAX_VOLUME_SIZE",
         p.Write(request_id=12, volume=7, offset=p.MAX_VOLUME_SIZE - 1, data=b"\x02")),
        ("zero", "A: write 1 MiB of zeroes", p.Zero(request_id=13, volume=7,
                                                     offset=1 << 20, length=1 << 20)),
        ("zero_large", "A: ZERO of 64 MiB: a ZERO's length is bounded by the volume's "
         "size only, not by MAX_DATA [FR-18]",
         p.Zero(request_id=14, volume=7, offset=1 << 30, length=64 << 20)),
        ("ack", "H: request 13 is durable", p.Ack(request_id=13)),
        ("flush", "A: barrier", p.Flush(request_id=14)),
        ("read", "H: read 64 KiB at offset 0", p.Read(request_id=1, volume=7,
                                                      offset=0, length=65536)),
        ("read_reply", "A: the data of READ 2",
         p.ReadReply(request_id=2, volume=7, offset=65536, data=DATA)),
        ("read_reply_zero", "A: READ 3's range reads as zeroes (flag ZERO, no payload)",
         p.ReadReply(request_id=3, volume=7, offset=131072, length=65536,
                     flags=p.FLAG_ZERO)),
        ("dirty_query", "H: which regions of volume 7 are pending?",
         p.DirtyQuery(request_id=4, volume=7)),
        ("dirty_map", "A: three pending extents",
         p.DirtyMap(request_id=4, volume=7,
                    extents=[(0, 65536), (131072, 65536), (1 << 30, 1 << 20)])),
        ("dirty_map_unsolicited", "A: unasked report (request_id 0) of one region "
         "it could not stream", p.DirtyMap(request_id=0, volume=7,
                                           extents=[(196608, 65536)])),
        ("dirty_map_empty", "A: nothing pending", p.DirtyMap(request_id=5, volume=7)),
        ("dirty_map_touching", "A: two extents that touch (the first ends where the "
         "second begins): allowed, an agent need not merge them [SY-7]",
         p.DirtyMap(request_id=6, volume=7, extents=[(0, 65536), (65536, 65536)])),
        ("checksum_query", "H: SHA-256 of 64 KiB pieces of a 100 KiB range",
         p.ChecksumQuery(request_id=6, volume=7, offset=0, length=102400,
                         chunk_size=65536)),
        ("checksums", "A: two digests, the last piece is 36 KiB",
         p.Checksums(request_id=6, volume=7, offset=0, length=102400, chunk_size=65536,
                     digests=[SHA_A, SHA_B])),
        ("synced", "H: the answer to READ 2 is durable",
         p.Synced(request_id=2, volume=7, offset=65536, length=44)),
        ("extent_query", "H: which parts of 1 MiB read as zeroes? (feature EXTENTS)",
         p.ExtentQuery(request_id=8, volume=7, offset=1 << 20, length=1 << 20)),
        ("extents", "A: 64 KiB of data, then 512 KiB of zeroes: a prefix of the range",
         p.Extents(request_id=8, volume=7, offset=1 << 20, length=1 << 20,
                   extents=[(65536, 0), (524288, p.EXTENT_ZERO)])),
        ("checkpoint", "A: a named point in the stream",
         p.Checkpoint(request_id=15, name="before-upgrade")),
        ("recover_open_test", "A: fail-over test at the latest point",
         p.RecoverOpen(request_id=16, mode=p.RecoverMode.TEST, name="disk0")),
        ("recover_open_failover", "A: fail over to a point given as a time stamp",
         p.RecoverOpen(request_id=17, mode=p.RecoverMode.FAILOVER, name="disk0",
                       point="2026-11-25T18:00:00Z")),
        ("recover_ready", "H: session 3, 1 GiB, point time",
         p.RecoverReady(request_id=16, volume=3, size=1 << 30,
                        point_time_ns=1795629600000000000)),
        ("rread", "A: read the recovery volume",
         p.RRead(request_id=18, volume=3, offset=512, length=4096)),
        ("rread_reply", "H: data of RREAD 18",
         p.RReadReply(request_id=18, volume=3, offset=512, data=DATA)),
        ("rread_reply_zero", "H: RREAD 19's range is zeroes",
         p.RReadReply(request_id=19, volume=3, offset=0, length=4096, flags=p.FLAG_ZERO)),
        ("rwrite", "A: write to the recovery volume",
         p.RWrite(request_id=20, volume=3, offset=8192, data=DATA)),
        ("rwrite_zero", "A: write zeroes to the recovery volume",
         p.RWrite(request_id=21, volume=3, offset=8192, length=4096, flags=p.FLAG_ZERO)),
        ("rflush", "A: flush the recovery volume", p.RFlush(request_id=22, volume=3)),
        ("recover_close", "A: close session 3", p.RecoverClose(request_id=23, volume=3)),
        ("failback_begin", "H: prepare volume 7 for a fail-back (feature FAILBACK)",
         p.FailbackBegin(request_id=30, volume=7)),
        ("put", "H: write the hub's data into the protected volume",
         p.Put(request_id=31, volume=7, offset=65536, data=DATA)),
        ("put_zero", "H: the range becomes zeroes",
         p.Put(request_id=32, volume=7, offset=0, length=65536, flags=p.FLAG_ZERO)),
        ("failback_end", "H: every PUT is in: protection resumes",
         p.FailbackEnd(request_id=33, volume=7, outcome=p.FailbackOutcome.DONE)),
        ("failback_end_abort", "H: the fail-back is abandoned",
         p.FailbackEnd(request_id=34, volume=7, outcome=p.FailbackOutcome.ABORT)),
        ("ping", "either side: heartbeat", p.Ping(request_id=24, sent_ns=1795629600123456789)),
        ("pong", "answer to PING 24",
         p.Pong(request_id=24, echo_ns=1795629600123456789,
                responder_ns=1795629600223456789)),
        ("error", "H: WRITE 25 failed: no such volume (non-ASCII text)",
         p.Error(request_id=25, code=p.ErrorCode.NO_SUCH_VOLUME,
                 failed_type=p.MsgType.WRITE, message="volume 9 is not attached \u2013 attach it first")),
        ("error_unknown_code", "a code this codec does not know is carried as a number",
         p.Error(request_id=0, code=999, failed_type=0, message="")),
        ("goodbye", "either side: the sender closes", p.Goodbye(reason="shutting down")),
        ("goodbye_code_shutdown", "GOODBYE with its code (feature GOODBYE_CODE): SHUTDOWN",
         p.Goodbye(reason="shutting down", code=p.GoodbyeCode.SHUTDOWN)),
        ("goodbye_code_failed_back", "H: a fail-back ended the recovery session (FB-12, LV-5)",
         p.Goodbye(reason="volume vol0 failed back to agent a1",
                   code=p.GoodbyeCode.FAILED_BACK)),
        ("goodbye_code_storage_recovered", "H: the hub's storage recovered (RP-11, LV-5)",
         p.Goodbye(reason="", code=p.GoodbyeCode.STORAGE_RECOVERED)),
        ("goodbye_code_unknown", "a code this edition does not define: read as UNSPECIFIED",
         p.Goodbye(reason="later", code=200)),
    ]
    return m


def handshake_messages() -> list[tuple[str, str, p.Message]]:
    hub = p.hub_proof(SECRET, NONCE_A, NONCE_H, AGENT_ID, HUB_ID)
    agent = p.agent_proof(SECRET, NONCE_A, NONCE_H, AGENT_ID, HUB_ID)
    return [
        ("hello", "A -> H", p.Hello(min_version=1, max_version=1, features=0,
                                    nonce=NONCE_A, agent_id=AGENT_ID)),
        ("hello_reply", "H -> A", p.HelloReply(version=1, features=0, nonce=NONCE_H,
                                               proof=hub, hub_id=HUB_ID)),
        ("auth", "A -> H", p.Auth(proof=agent)),
        ("auth_ok", "H -> A", p.AuthOk()),
    ]


# ---------------------------------------------------------------------------
# Malformed frames

def frame(msg_type, payload=b"", *, flags=0, request_id=0, volume=0, offset=0,
          length=0, magic=p.MAGIC, version=p.VERSION, payload_length=None,
          payload_crc=None, header_crc=None) -> bytes:
    """Build a frame field by field, valid unless a field is overridden."""
    body = p.HEADER_BODY.pack(
        magic, version, msg_type, flags, request_id, volume,
        len(payload) if payload_length is None else payload_length, offset, length,
        zlib.crc32(payload) if payload_crc is None else payload_crc)
    crc = zlib.crc32(body) if header_crc is None else header_crc
    return body + struct.pack("!I", crc) + payload


def text(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


T = p.MsgType
HELLO_FIXED = struct.pack("!BBHI", 1, 1, 0, 0) + NONCE_A
ATTACH_FIXED = struct.pack("!QIBB", 1 << 30, 65536, 0, 0) + GENERATION
GOOD_WRITE = frame(T.WRITE, DATA, request_id=1, volume=7, offset=4096, length=len(DATA))


def malformed() -> list[tuple[str, str, bytes, str, str]]:
    """(name, description, wire bytes, error class, ErrorCode name)."""
    cs_fixed = struct.pack("!IB3x", 65536, 1)
    v = [
        # -- frame header, one per field ------------------------------------
        ("bad_magic", "magic is 0x52504C32, not 0x52504C31",
         frame(T.ACK, request_id=1, magic=0x52504C32), "BadMagic"),
        ("bad_magic_nbd", "an NBD request magic where a frame starts",
         frame(T.ACK, request_id=1, magic=0x25609513), "BadMagic"),
        ("bad_version_0", "version 0", frame(T.ACK, request_id=1, version=0), "BadVersion"),
        ("bad_version_2", "version 2 (a later framing; v1 cannot read it)",
         frame(T.ACK, request_id=1, version=2), "BadVersion"),
        ("bad_header_crc", "header_crc off by one",
         frame(T.ACK, request_id=1, header_crc=zlib.crc32(
             p.HEADER_BODY.pack(p.MAGIC, 1, T.ACK, 0, 1, 0, 0, 0, 0, 0)) ^ 1),
         "BadHeaderCRC"),
        ("bad_header_crc_bitflip", "a bit of request_id flipped in transit after the "
         "CRC was computed", flip(frame(T.ACK, request_id=1), 15, 0x01), "BadHeaderCRC"),
        ("payload_length_oversize", "payload_length MAX_PAYLOAD + 1, rejected before "
         "any payload is read or allocated",
         frame(T.WRITE, request_id=1, volume=7, length=p.MAX_PAYLOAD + 1,
               payload_length=p.MAX_PAYLOAD + 1), "PayloadTooLarge"),
        ("payload_length_max_u32", "payload_length 0xFFFFFFFF",
         frame(T.WRITE, request_id=1, volume=7, payload_length=0xFFFFFFFF),
         "PayloadTooLarge"),
        ("bad_payload_crc", "payload_crc does not match the payload",
         frame(T.WRITE, DATA, request_id=1, volume=7, offset=4096, length=len(DATA),
               payload_crc=zlib.crc32(DATA) ^ 0x80000000), "BadPayloadCRC"),
        ("bad_payload_crc_bitflip", "one payload bit flipped in transit",
         flip(GOOD_WRITE, p.HEADER_SIZE + 3, 0x10), "BadPayloadCRC"),
        ("bad_payload_crc_empty", "no payload but payload_crc is not 0 (CRC-32 of "
         "nothing is 0)", frame(T.ACK, request_id=1, payload_crc=1), "BadPayloadCRC"),
        ("unknown_type", "type 0x7F is not defined; the frame (with its payload) is "
         "skipped and answered with ERROR(UNSUPPORTED)",
         frame(0x7F, b"future", request_id=5), "UnsupportedMessage"),
        ("unknown_type_zero", "type 0 is never defined", frame(0, request_id=5),
         "UnsupportedMessage"),
        ("unknown_must_understand_flag", "flag bit 1 on WRITE: must be understood, "
         "is not defined", frame(T.WRITE, DATA, flags=1 << 1, request_id=1, volume=7,
                                 offset=0, length=len(DATA)), "UnsupportedFlags"),
        ("flag_zero_on_write", "FLAG_ZERO is defined for READ_REPLY, RREAD_REPLY, "
         "RWRITE and PUT only", frame(T.WRITE, flags=p.FLAG_ZERO, request_id=1, volume=7,
                              length=4096), "UnsupportedFlags"),
        ("request_id_unused", "HELLO does not use request_id; it is 5",
         frame(T.HELLO, HELLO_FIXED + text(b"agent-1"), request_id=5), "InvalidField"),
        ("request_id_unused_goodbye", "GOODBYE does not use request_id; it is 5 "
         "(never answered [ER-3])",
         frame(T.GOODBYE, text(b"bye"), request_id=5), "InvalidField"),
        ("request_id_zero_write", "a WRITE (a request) with request_id 0: its ACK could "
         "not be matched to it [RP-12]",
         frame(T.WRITE, DATA, volume=7, offset=4096, length=len(DATA)), "BadRequestId"),
        ("request_id_zero_ping", "a PING with request_id 0 [RP-12]",
         frame(T.PING, struct.pack("!Q", 1)), "BadRequestId"),
        ("volume_unused", "ACK does not use volume; it is 7",
         frame(T.ACK, request_id=1, volume=7), "InvalidField"),
        ("offset_unused", "PING does not use offset; it is 4096",
         frame(T.PING, struct.pack("!Q", 1), request_id=1, offset=4096), "InvalidField"),
        ("length_unused", "FLUSH does not use length; it is 512",
         frame(T.FLUSH, request_id=1, length=512), "InvalidField"),
        ("offset_length_overflow", "offset 2^64-4096 + length 8192 wraps 64 bits",
         frame(T.ZERO, request_id=1, volume=7, offset=(1 << 64) - 4096, length=8192),
         "OutOfRange"),
        ("offset_length_past_max_volume", "offset + length = 2^63, one past "
         "MAX_VOLUME_SIZE", frame(T.ZERO, request_id=1, volume=7, offset=1 << 62,
                                  length=1 << 62), "OutOfRange"),
        ("truncated_header", "the stream ends 20 bytes into a header",
         frame(T.ACK, request_id=1)[:20], "TruncatedFrame"),
        ("truncated_payload", "the stream ends 10 bytes into a 44-byte payload",
         GOOD_WRITE[:p.HEADER_SIZE + 10], "TruncatedFrame"),
        # -- payloads ---------------------------------------------------------
        ("write_length_mismatch", "WRITE length 4096, payload 44 bytes",
         frame(T.WRITE, DATA, request_id=1, volume=7, length=4096), "InvalidField"),
        ("write_length_zero", "WRITE length 0 with a payload",
         frame(T.WRITE, DATA, request_id=1, volume=7, length=0), "InvalidField"),
        ("write_empty", "WRITE with length 0 and no data",
         frame(T.WRITE, request_id=1, volume=7), "InvalidField"),
        ("zero_length_zero", "ZERO of 0 bytes", frame(T.ZERO, request_id=1, volume=7),
         "InvalidField"),
        ("read_too_long", "READ of MAX_DATA + 1 bytes",
         frame(T.READ, request_id=1, volume=7, length=p.MAX_DATA + 1), "InvalidField"),
        ("read_reply_zero_too_long", "READ_REPLY flag ZERO of MAX_DATA + 1 bytes: "
         "FLAG_ZERO frames are bounded as their data would be [FR-18]",
         frame(T.READ_REPLY, flags=p.FLAG_ZERO, request_id=1, volume=7,
               length=p.MAX_DATA + 1), "InvalidField"),
        ("read_reply_zero_with_payload", "READ_REPLY flag ZERO carrying data",
         frame(T.READ_REPLY, DATA, flags=p.FLAG_ZERO, request_id=1, volume=7,
               length=len(DATA)), "InvalidField"),
        ("hello_short", "HELLO payload cut inside the nonce",
         frame(T.HELLO, HELLO_FIXED[:20]), "InvalidField"),
        ("hello_trailing", "HELLO with one byte after agent_id",
         frame(T.HELLO, HELLO_FIXED + text(b"agent-1") + b"\x00"), "InvalidField"),
        ("hello_reserved", "HELLO reserved u16 is 1",
         frame(T.HELLO, struct.pack("!BBHI", 1, 1, 1, 0) + NONCE_A + text(b"agent-1")),
         "InvalidField"),
        ("hello_versions_reversed", "HELLO min_version 2 > max_version 1",
         frame(T.HELLO, struct.pack("!BBHI", 2, 1, 0, 0) + NONCE_A + text(b"agent-1")),
         "InvalidField"),
        ("hello_bad_name", "HELLO agent_id '../etc' is not a valid name",
         frame(T.HELLO, HELLO_FIXED + text(b"../etc")), "InvalidField", "BAD_NAME"),
        ("hello_empty_name", "HELLO agent_id is empty",
         frame(T.HELLO, HELLO_FIXED + text(b"")), "InvalidField", "BAD_NAME"),
        ("hello_name_not_utf8", "HELLO agent_id is not UTF-8",
         frame(T.HELLO, HELLO_FIXED + text(b"agent\xff")), "InvalidField"),
        ("hello_name_too_long", "HELLO agent_id length MAX_NAME + 1",
         frame(T.HELLO, HELLO_FIXED + text(b"a" * (p.MAX_NAME + 1))), "InvalidField"),
        ("hello_name_length_past_end", "HELLO agent_id length says 9, 7 bytes follow",
         frame(T.HELLO, HELLO_FIXED + struct.pack("!H", 9) + b"agent-1"), "InvalidField"),
        ("hello_reply_reserved", "HELLO_REPLY reserved byte is 1",
         frame(T.HELLO_REPLY, struct.pack("!BBHI", 1, 1, 0, 0) + NONCE_H + SHA_A
               + text(b"hub-1")), "InvalidField"),
        ("hello_reply_short", "HELLO_REPLY without its proof",
         frame(T.HELLO_REPLY, struct.pack("!BBHI", 1, 0, 0, 0) + NONCE_H), "InvalidField"),
        ("hello_reply_hub_id_not_utf8", "hub_id is not UTF-8",
         frame(T.HELLO_REPLY, struct.pack("!BBHI", 1, 0, 0, 0) + NONCE_H + SHA_A
               + text(b"\xc3\x28")), "InvalidField"),
        ("auth_short", "AUTH proof of 31 bytes", frame(T.AUTH, SHA_A[:31]), "InvalidField"),
        ("auth_trailing", "AUTH proof of 33 bytes", frame(T.AUTH, SHA_A + b"\x00"),
         "InvalidField"),
        ("auth_ok_trailing", "AUTH_OK with a payload", frame(T.AUTH_OK, b"\x00"),
         "InvalidField"),
        ("attach_bad_state", "ATTACH state 3 is not a VolumeState",
         frame(T.ATTACH, struct.pack("!QIBB", 1 << 30, 65536, 3, 0) + GENERATION
               + text(b"disk0"), request_id=1), "InvalidField"),
        ("attach_reserved", "ATTACH reserved byte is 1",
         frame(T.ATTACH, struct.pack("!QIBB", 1 << 30, 65536, 0, 1) + GENERATION
               + text(b"disk0"), request_id=1), "InvalidField"),
        ("attach_bad_name", "ATTACH name 'disk/0' contains a slash",
         frame(T.ATTACH, ATTACH_FIXED + text(b"disk/0"), request_id=1),
         "InvalidField", "BAD_NAME"),
        ("attach_name_dotdot", "ATTACH name '..'",
         frame(T.ATTACH, ATTACH_FIXED + text(b".."), request_id=1),
         "InvalidField", "BAD_NAME"),
        ("attach_name_too_long", "ATTACH name of MAX_NAME + 1 bytes: a string over "
         "its limit is INVALID [FR-10], checked before the name's pattern",
         frame(T.ATTACH, ATTACH_FIXED + text(b"d" * (p.MAX_NAME + 1)), request_id=1),
         "InvalidField"),
        ("attach_name_empty", "ATTACH name is empty: not a name [FR-11]",
         frame(T.ATTACH, ATTACH_FIXED + text(b""), request_id=1), "InvalidField",
         "BAD_NAME"),
        ("attach_name_not_utf8", "ATTACH name is not UTF-8",
         frame(T.ATTACH, ATTACH_FIXED + text(b"disk\xe2\x82"), request_id=1),
         "InvalidField"),
        ("attach_chunk_not_power_of_two", "ATTACH chunk_size 65537",
         frame(T.ATTACH, struct.pack("!QIBB", 1 << 30, 65537, 0, 0) + GENERATION
               + text(b"disk0"), request_id=1), "InvalidField"),
        ("attach_chunk_too_small", "ATTACH chunk_size 2048 < MIN_CHUNK",
         frame(T.ATTACH, struct.pack("!QIBB", 1 << 30, 2048, 0, 0) + GENERATION
               + text(b"disk0"), request_id=1), "InvalidField"),
        ("attach_size_zero", "ATTACH size 0",
         frame(T.ATTACH, struct.pack("!QIBB", 0, 65536, 0, 0) + GENERATION
               + text(b"disk0"), request_id=1), "InvalidField"),
        ("attach_size_too_big", "ATTACH size 2^63 > MAX_VOLUME_SIZE",
         frame(T.ATTACH, struct.pack("!QIBB", 1 << 63, 65536, 0, 0) + GENERATION
               + text(b"disk0"), request_id=1), "InvalidField"),
        ("attach_short", "ATTACH cut inside the generation",
         frame(T.ATTACH, ATTACH_FIXED[:20], request_id=1), "InvalidField"),
        ("attached_bad_plan", "ATTACHED plan 9 is not a SyncPlan",
         frame(T.ATTACHED, b"\x09\x00\x00\x00", request_id=1, volume=7), "InvalidField"),
        ("attached_reserved", "ATTACHED reserved bytes not zero",
         frame(T.ATTACHED, b"\x00\x00\x01\x00", request_id=1, volume=7), "InvalidField"),
        ("attached_short", "ATTACHED payload of 1 byte",
         frame(T.ATTACHED, b"\x00", request_id=1, volume=7), "InvalidField"),
        ("detach_trailing", "DETACH with a payload",
         frame(T.DETACH, b"\x00", request_id=1, volume=7), "InvalidField"),
        ("ack_trailing", "ACK with a payload", frame(T.ACK, b"\x00", request_id=1),
         "InvalidField"),
        ("dirty_map_ragged", "DIRTY_MAP payload of 20 bytes, not a multiple of 16",
         frame(T.DIRTY_MAP, bytes(20), request_id=1, volume=7), "InvalidField"),
        ("dirty_map_overlap", "DIRTY_MAP extents overlap",
         frame(T.DIRTY_MAP, struct.pack("!QQQQ", 0, 8192, 4096, 4096), request_id=1,
               volume=7), "InvalidField"),
        ("dirty_map_unsorted", "DIRTY_MAP extents out of order",
         frame(T.DIRTY_MAP, struct.pack("!QQQQ", 8192, 4096, 0, 4096), request_id=1,
               volume=7), "InvalidField"),
        ("dirty_map_empty_extent", "DIRTY_MAP extent of length 0",
         frame(T.DIRTY_MAP, struct.pack("!QQ", 4096, 0), request_id=1, volume=7),
         "InvalidField"),
        ("dirty_query_trailing", "DIRTY_QUERY with a payload",
         frame(T.DIRTY_QUERY, b"\x00", request_id=1, volume=7), "InvalidField"),
        ("checksum_query_bad_algorithm", "CHECKSUM_QUERY algorithm 2 is not defined",
         frame(T.CHECKSUM_QUERY, struct.pack("!IB3x", 65536, 2), request_id=1, volume=7,
               length=65536), "InvalidField"),
        ("checksum_query_reserved", "CHECKSUM_QUERY reserved bytes not zero",
         frame(T.CHECKSUM_QUERY, struct.pack("!IB3s", 65536, 1, b"\x00\x00\x01"),
               request_id=1, volume=7, length=65536), "InvalidField"),
        ("checksum_query_short", "CHECKSUM_QUERY payload of 4 bytes",
         frame(T.CHECKSUM_QUERY, cs_fixed[:4], request_id=1, volume=7, length=65536),
         "InvalidField"),
        ("checksum_query_bad_chunk", "CHECKSUM_QUERY chunk_size 1000",
         frame(T.CHECKSUM_QUERY, struct.pack("!IB3x", 1000, 1), request_id=1, volume=7,
               length=65536), "InvalidField"),
        ("checksum_query_length_zero", "CHECKSUM_QUERY of an empty range",
         frame(T.CHECKSUM_QUERY, cs_fixed, request_id=1, volume=7), "InvalidField"),
        ("checksum_query_too_many_chunks", "CHECKSUM_QUERY whose answer would exceed "
         "MAX_PAYLOAD", frame(T.CHECKSUM_QUERY, struct.pack("!IB3x", 4096, 1),
                              request_id=1, volume=7, length=4096 << 20),
         "InvalidField"),
        ("checksums_wrong_count", "CHECKSUMS with 1 digest for 2 chunks",
         frame(T.CHECKSUMS, cs_fixed + SHA_A, request_id=1, volume=7, length=102400),
         "InvalidField"),
        ("checksums_ragged", "CHECKSUMS digests of 40 bytes",
         frame(T.CHECKSUMS, cs_fixed + SHA_A + bytes(8), request_id=1, volume=7,
               length=65536), "InvalidField"),
        ("synced_trailing", "SYNCED with a payload",
         frame(T.SYNCED, b"\x00", request_id=1, volume=7, length=4096), "InvalidField"),
        ("extent_query_length_zero", "EXTENT_QUERY of 0 bytes",
         frame(T.EXTENT_QUERY, request_id=1, volume=7), "InvalidField"),
        ("extents_none", "EXTENTS without an extent",
         frame(T.EXTENTS, request_id=1, volume=7, length=4096), "InvalidField"),
        ("extents_too_long", "EXTENTS covering 8192 bytes of a 4096-byte query",
         frame(T.EXTENTS, struct.pack("!QI4x", 8192, 1), request_id=1, volume=7,
               length=4096), "InvalidField"),
        ("extents_empty_extent", "EXTENTS extent of length 0",
         frame(T.EXTENTS, struct.pack("!QI4x", 0, 0), request_id=1, volume=7,
               length=4096), "InvalidField"),
        ("extents_bad_flags", "EXTENTS extent flag 0x2 is not defined",
         frame(T.EXTENTS, struct.pack("!QI4x", 4096, 2), request_id=1, volume=7,
               length=4096), "InvalidField"),
        ("extents_reserved", "EXTENTS extent reserved bytes not zero",
         frame(T.EXTENTS, struct.pack("!QII", 4096, 0, 1), request_id=1, volume=7,
               length=4096), "InvalidField"),
        ("extents_ragged", "EXTENTS payload of 20 bytes",
         frame(T.EXTENTS, bytes(20), request_id=1, volume=7, length=4096), "InvalidField"),
        ("checkpoint_bad_name", "CHECKPOINT name '-x' starts with '-'",
         frame(T.CHECKPOINT, text(b"-x"), request_id=1), "InvalidField", "BAD_NAME"),
        ("checkpoint_not_utf8", "CHECKPOINT name is not UTF-8",
         frame(T.CHECKPOINT, text(b"\xff\xfe"), request_id=1), "InvalidField"),
        ("checkpoint_short", "CHECKPOINT without its name length",
         frame(T.CHECKPOINT, b"\x00", request_id=1), "InvalidField"),
        ("recover_open_bad_mode", "RECOVER_OPEN mode 3",
         frame(T.RECOVER_OPEN, b"\x03\x00\x00\x00" + text(b"disk0") + text(b"latest"),
               request_id=1), "InvalidField"),
        ("recover_open_reserved", "RECOVER_OPEN reserved bytes not zero",
         frame(T.RECOVER_OPEN, b"\x01\x00\x00\x01" + text(b"disk0") + text(b"latest"),
               request_id=1), "InvalidField"),
        ("recover_open_empty_point", "RECOVER_OPEN point is empty",
         frame(T.RECOVER_OPEN, b"\x01\x00\x00\x00" + text(b"disk0") + text(b""),
               request_id=1), "InvalidField"),
        ("recover_open_bad_name", "RECOVER_OPEN name has a space",
         frame(T.RECOVER_OPEN, b"\x01\x00\x00\x00" + text(b"disk 0") + text(b"latest"),
               request_id=1), "InvalidField", "BAD_NAME"),
        ("recover_open_point_not_utf8", "RECOVER_OPEN point is not UTF-8",
         frame(T.RECOVER_OPEN, b"\x01\x00\x00\x00" + text(b"disk0") + text(b"\xc0\xaf"),
               request_id=1), "InvalidField"),
        ("recover_open_short", "RECOVER_OPEN without its point",
         frame(T.RECOVER_OPEN, b"\x01\x00\x00\x00" + text(b"disk0"), request_id=1),
         "InvalidField"),
        ("recover_ready_short", "RECOVER_READY without point_time_ns",
         frame(T.RECOVER_READY, struct.pack("!Q", 1 << 30), request_id=1, volume=3),
         "InvalidField"),
        ("rread_length_zero", "RREAD of 0 bytes",
         frame(T.RREAD, request_id=1, volume=3), "InvalidField"),
        ("rread_reply_length_mismatch", "RREAD_REPLY length 4096, 44 bytes of data",
         frame(T.RREAD_REPLY, DATA, request_id=1, volume=3, length=4096), "InvalidField"),
        ("rwrite_zero_too_long", "RWRITE flag ZERO of MAX_DATA + 1 bytes",
         frame(T.RWRITE, flags=p.FLAG_ZERO, request_id=1, volume=3,
               length=p.MAX_DATA + 1), "InvalidField"),
        ("rread_reply_zero_too_long", "RREAD_REPLY flag ZERO of MAX_DATA + 1 bytes [FR-18]",
         frame(T.RREAD_REPLY, flags=p.FLAG_ZERO, request_id=1, volume=3,
               length=p.MAX_DATA + 1), "InvalidField"),
        ("rflush_trailing", "RFLUSH with a payload",
         frame(T.RFLUSH, b"\x00", request_id=1, volume=3), "InvalidField"),
        ("recover_close_trailing", "RECOVER_CLOSE with a payload",
         frame(T.RECOVER_CLOSE, b"\x00", request_id=1, volume=3), "InvalidField"),
        ("put_length_mismatch", "PUT length 4096, 44 bytes of data",
         frame(T.PUT, DATA, request_id=1, volume=7, length=4096), "InvalidField"),
        ("put_zero_with_data", "PUT flag ZERO with 44 bytes of payload",
         frame(T.PUT, DATA, flags=p.FLAG_ZERO, request_id=1, volume=7, length=44),
         "InvalidField"),
        ("put_zero_too_long", "PUT flag ZERO of MAX_DATA + 1 bytes [FR-18]",
         frame(T.PUT, flags=p.FLAG_ZERO, request_id=1, volume=7, length=p.MAX_DATA + 1),
         "InvalidField"),
        ("failback_begin_trailing", "FAILBACK_BEGIN with a payload",
         frame(T.FAILBACK_BEGIN, b"\x00", request_id=1, volume=7), "InvalidField"),
        ("failback_end_bad_outcome", "FAILBACK_END outcome 2",
         frame(T.FAILBACK_END, b"\x02\x00\x00\x00", request_id=1, volume=7),
         "InvalidField"),
        ("failback_end_reserved", "FAILBACK_END reserved bytes not zero",
         frame(T.FAILBACK_END, b"\x00\x01\x00\x00", request_id=1, volume=7),
         "InvalidField"),
        ("failback_end_short", "FAILBACK_END without its outcome",
         frame(T.FAILBACK_END, request_id=1, volume=7), "InvalidField"),
        ("ping_short", "PING with a 4-byte timestamp",
         frame(T.PING, b"\x00" * 4, request_id=1), "InvalidField"),
        ("pong_trailing", "PONG with 17 bytes",
         frame(T.PONG, bytes(17), request_id=1), "InvalidField"),
        ("error_short", "ERROR without its message length",
         frame(T.ERROR, struct.pack("!IB", 1, 0), request_id=1), "InvalidField"),
        ("error_not_utf8", "ERROR message is not UTF-8",
         frame(T.ERROR, struct.pack("!IB", 1, 0) + text(b"\x80"), request_id=1),
         "InvalidField"),
        ("error_text_too_long", "ERROR message of MAX_TEXT + 1 bytes",
         frame(T.ERROR, struct.pack("!IB", 1, 0) + text(b"x" * (p.MAX_TEXT + 1)),
               request_id=1), "InvalidField"),
        ("goodbye_not_utf8", "GOODBYE reason is not UTF-8",
         frame(T.GOODBYE, text(b"bye\xff")), "InvalidField"),
        ("rread_too_long", "RREAD of MAX_DATA + 1 bytes",
         frame(T.RREAD, request_id=1, volume=3, length=p.MAX_DATA + 1), "InvalidField"),
        ("goodbye_length_past_end", "GOODBYE reason length 10, 3 bytes follow",
         frame(T.GOODBYE, struct.pack("!H", 10) + b"bye"), "InvalidField"),
        ("goodbye_code_short", "GOODBYE code without its 3 reserved bytes",
         frame(T.GOODBYE, text(b"bye") + b"\x01"), "InvalidField"),
        ("goodbye_code_reserved", "GOODBYE code with reserved bytes not zero",
         frame(T.GOODBYE, text(b"bye") + b"\x01\x00\x01\x00"), "InvalidField"),
    ]
    out = []
    for item in v:
        name, desc, raw, error = item[:4]
        code = item[4] if len(item) > 4 else p.ERROR_CLASSES[error].code.name
        out.append((name, desc, raw, error, code))
    return out


def flip(raw: bytes, index: int, mask: int) -> bytes:
    out = bytearray(raw)
    out[index] ^= mask
    return bytes(out)


# ---------------------------------------------------------------------------
# Building and checking the documents

def valid_vector(name: str, desc: str, msg: p.Message) -> dict:
    raw = p.encode(msg)
    back = p.decode(raw)
    if back.fields() != msg.fields() or p.encode(back) != raw:
        raise SystemExit(f"vector {name}: does not survive a round trip")
    return {"name": name, "description": desc, "type": msg.TYPE.name,
            "fields": msg.fields(), "hex": raw.hex()}


def error_vector(name: str, desc: str, raw: bytes, error: str, code: str) -> dict:
    request_id = 0
    try:
        p.decode(raw)
    except p.ReplicationError as err:
        raised, request_id = err, err.request_id
        got = type(err).__name__
        if got != error or err.code.name != code:
            raise SystemExit(f"vector {name}: raised {got}/{err.code.name} "
                             f"({err}), expected {error}/{code}")
    else:
        raise SystemExit(f"vector {name}: decoded, expected {error}")
    phase = vector_phase(raw, raised)
    if isinstance(raised, p.ProtocolError) or phase == "handshake":
        action, request_id = "close", 0     # [ER-1]; in the handshake [HS-12]
    else:  # a request error: answered with ERROR unless [ER-3] forbids it
        action = "answer" if p.may_answer_with_error(raised) else "drop"
    return {"name": name, "description": desc, "phase": phase, "error": error,
            "code": code, "action": action, "request_id": request_id, "hex": raw.hex()}


#: Errors found in the header, before the frame's type is looked at.
HEADER_ERRORS = (p.BadMagic, p.BadVersion, p.BadHeaderCRC, p.PayloadTooLarge,
                 p.TruncatedFrame, p.BadPayloadCRC)


def vector_phase(raw: bytes, raised: p.ReplicationError) -> str:
    """Where the vector's outcome holds (tests/vectors/README.md "Format",
    field ``phase``)."""
    if isinstance(raised, HEADER_ERRORS):
        return "any"
    if raw[5] in (T.HELLO, T.HELLO_REPLY, T.AUTH, T.AUTH_OK):
        return "handshake"
    return "established"


def documents() -> dict[str, dict]:
    common = {"format": FORMAT, "spec": "PROTOCOL.md",
              "generator": "tests/vectors/generate.py"}
    hs = handshake_messages()
    hub_t = p._transcript(p.HUB_LABEL, NONCE_A, NONCE_H, AGENT_ID, HUB_ID)
    agent_t = p._transcript(p.AGENT_LABEL, NONCE_A, NONCE_H, AGENT_ID, HUB_ID)
    write = p.Write(request_id=1, volume=1, offset=4096, data=b"hello, replica!\n")
    return {
        "messages.json": {
            **common,
            "description": "One or more valid frames per message type: the wire "
                           "bytes and the decoded fields.",
            "vectors": [valid_vector(*m) for m in valid_messages()],
        },
        "malformed.json": {
            **common,
            "description": "Frames a receiver must reject, each with the error "
                           "class raised and the ErrorCode it maps to.",
            "vectors": [error_vector(*m) for m in malformed()],
        },
        "handshake.json": {
            **common,
            "description": "A complete HELLO..AUTH_OK exchange with a fixed secret "
                           "and fixed nonces, then the first WRITE.",
            "secret": SECRET.hex(),
            "agent_id": AGENT_ID,
            "hub_id": HUB_ID,
            "agent_nonce": NONCE_A.hex(),
            "hub_nonce": NONCE_H.hex(),
            "hub_transcript": hub_t.hex(),
            "hub_proof": p.hub_proof(SECRET, NONCE_A, NONCE_H, AGENT_ID, HUB_ID).hex(),
            "agent_transcript": agent_t.hex(),
            "agent_proof": p.agent_proof(SECRET, NONCE_A, NONCE_H, AGENT_ID, HUB_ID).hex(),
            "vectors": [valid_vector(n, d, m) for n, d, m in hs]
            + [valid_vector("write", "A -> H: the first WRITE after AUTH_OK", write)],
        },
    }


def render(doc: dict) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for name, doc in documents().items():
        path = HERE / name
        text_ = render(doc)
        if "--check" in argv:
            if not path.exists() or path.read_text(encoding="utf-8") != text_:
                stale.append(name)
        else:
            path.write_text(text_, encoding="utf-8")
            print(f"wrote {path} ({len(doc['vectors'])} vectors)")
    if stale:
        print(f"stale: {', '.join(stale)}; run python3 tests/vectors/generate.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
