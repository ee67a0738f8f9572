"""The codec against the golden vectors, real sockets and random messages.

Layout of this file:
  1. vectors both ways (tests/vectors/*.json): encode, decode, one byte at a
     time, with trailing bytes, malformed frames with their exact error;
  2. the blocking shim over socket.socketpair (32 MiB WRITE, EOF, truncation);
  3. seeded round-trip property tests over random messages of every type;
  4. the HMAC handshake helpers;
  5. encoder-side checks and small helpers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import pathlib
import random
import re
import socket
import struct
import threading
import zlib

import pytest

import protocol as p
from hubtools import CountingSocket

VECTORS = pathlib.Path(__file__).resolve().parent / "vectors"
VALID = (p.load_vectors(VECTORS / "messages.json")
         + p.load_vectors(VECTORS / "handshake.json"))
MALFORMED = p.load_vectors(VECTORS / "malformed.json")
HANDSHAKE = json.loads((VECTORS / "handshake.json").read_text(encoding="utf-8"))


def ids(vectors):
    return [v["name"] for v in vectors]


# ---------------------------------------------------------------------------
# 1. Vectors


def test_corpus_is_up_to_date_with_the_codec():
    spec = importlib.util.spec_from_file_location("generate", VECTORS / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert generate.main(["--check"]) == 0


def test_every_message_type_has_a_valid_vector():
    assert {v["type"] for v in VALID} == {t.name for t in p.MsgType}


def test_every_error_class_and_header_field_has_a_malformed_vector():
    raised = {v["error"] for v in MALFORMED}
    assert raised == set(p.ERROR_CLASSES) - {"ReplicationError", "ProtocolError",
                                             "RequestError"}
    names = " ".join(ids(MALFORMED))
    for field in ("magic", "version", "header_crc", "payload_length", "payload_crc",
                  "unknown_type", "flag", "request_id", "volume", "offset", "length",
                  "overflow", "truncated"):
        assert field in names, field


def test_every_message_type_has_a_malformed_vector():
    types = {v["bytes"][5] for v in MALFORMED if len(v["bytes"]) >= p.HEADER_SIZE}
    assert set(p.MsgType) <= types


@pytest.mark.parametrize("v", VALID, ids=ids(VALID))
def test_encode_gives_the_vector_bytes(v):
    msg = p.message_from_fields(v["type"], v["fields"])
    assert p.encode(msg) == v["bytes"]
    assert b"".join(bytes(x) for x in msg.encode()) == v["bytes"]


@pytest.mark.parametrize("v", VALID, ids=ids(VALID))
def test_decode_gives_the_vector_fields(v):
    msg = p.decode(v["bytes"])
    assert msg.TYPE.name == v["type"]
    assert msg.fields() == v["fields"]


@pytest.mark.parametrize("v", VALID, ids=ids(VALID))
def test_decoder_fed_one_byte_at_a_time(v):
    dec = p.Decoder()
    raw = v["bytes"]
    for i, byte in enumerate(raw[:-1]):
        dec.feed(raw[i:i + 1])
        assert dec.next_message() is None
    dec.feed(raw[-1:])
    msg = dec.next_message()
    assert msg is not None and msg.fields() == v["fields"]
    assert dec.next_message() is None
    assert dec.pending() == 0
    dec.close()


@pytest.mark.parametrize("v", VALID, ids=ids(VALID))
def test_decoder_keeps_trailing_bytes_pending(v):
    follower = p.encode(p.Ack(request_id=99))
    dec = p.Decoder()
    dec.feed(v["bytes"] + follower[:17])
    assert dec.next_message().fields() == v["fields"]
    assert dec.next_message() is None
    assert dec.pending() == 17
    with pytest.raises(p.TruncatedFrame):
        dec.close()
    dec.feed(follower[17:])
    assert dec.next_message() == p.Ack(request_id=99)
    dec.close()


def test_whole_corpus_as_one_stream_in_odd_chunks():
    stream = b"".join(v["bytes"] for v in VALID)
    dec = p.Decoder()
    got = []
    for i in range(0, len(stream), 37):
        dec.feed(memoryview(stream)[i:i + 37])
        got.extend(dec)
    dec.close()
    assert [m.fields() for m in got] == [v["fields"] for v in VALID]


HANDSHAKE_TYPES = {p.MsgType.HELLO, p.MsgType.HELLO_REPLY, p.MsgType.AUTH, p.MsgType.AUTH_OK}


@pytest.mark.parametrize("v", MALFORMED, ids=ids(MALFORMED))
def test_malformed_frame_raises_the_named_error(v):
    with pytest.raises(p.ReplicationError) as info:
        p.decode(v["bytes"])
    err = info.value
    assert type(err).__name__ == v["error"]
    assert err.code.name == v["code"]
    # The codec is context-free: in the handshake every error closes [HS-12].
    assert isinstance(err, p.ProtocolError) == (v["action"] == "close"
                                                and v["phase"] != "handshake")
    if v["action"] != "close":  # "drop": [ER-3] forbids an ERROR answer
        assert p.may_answer_with_error(err) == (v["action"] == "answer")
        assert err.request_id == v["request_id"]
    assert v["phase"] == ("any" if v["code"] == "PROTOCOL" and v["error"] != "BadRequestId"
                          else "handshake" if v["bytes"][5] in HANDSHAKE_TYPES
                          else "established")
    assert str(err)  # every error says what was wrong


@pytest.mark.parametrize("v", MALFORMED, ids=ids(MALFORMED))
def test_decoder_on_malformed_stream_closes_or_goes_on(v):
    """Feed the bad frame byte by byte, then a good ACK: a ProtocolError
    breaks the decoder for good; a RequestError consumes exactly the bad
    frame and the ACK decodes next."""
    dec = p.Decoder()
    ack = p.encode(p.Ack(request_id=42))
    expected = p.ERROR_CLASSES[v["error"]]
    with pytest.raises(expected) as info:
        for i in range(len(v["bytes"])):
            dec.feed(v["bytes"][i:i + 1])
            assert dec.next_message() is None
        dec.close()  # only a truncated frame gets here
    assert type(info.value) is expected
    if expected is p.TruncatedFrame:
        return  # the stream has ended: nothing follows
    dec.feed(ack)
    if isinstance(info.value, p.ProtocolError):
        with pytest.raises(expected):
            dec.next_message()
    else:
        assert dec.next_message() == p.Ack(request_id=42)
        err = p.Error.from_exception(info.value)
        assert err.code == p.ErrorCode[v["code"]]
        assert err.request_id == (v["request_id"] if v["phase"] != "handshake"
                                  else info.value.request_id)
        assert p.decode(p.encode(err)).fields() == err.fields()


def test_load_vectors_rejects_unknown_error_class(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"vectors": [{"name": "x", "hex": "00", "error": "Nope"}]}))
    with pytest.raises(ValueError, match="Nope"):
        p.load_vectors(path)


# ---------------------------------------------------------------------------
# 2. Blocking shim over real sockets


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_send_and_recv_every_vector_over_a_socket(pair):
    a, b = pair
    header_buf = bytearray(p.HEADER_SIZE)
    for v in VALID:
        p.send_message(a, p.message_from_fields(v["type"], v["fields"]))
        msg = p.recv_message(b, header_buf)
        assert msg.fields() == v["fields"]
    a.shutdown(socket.SHUT_WR)
    assert p.recv_message(b) is None  # clean EOF at a frame boundary


def test_32_mib_write_over_a_socket_without_payload_copies(pair):
    a, b = pair
    data = bytearray(random.Random(1).randbytes(p.MAX_DATA))
    msg = p.Write(request_id=1, volume=1, offset=0, data=data)
    parts = msg.encode()
    assert parts[1] is data  # the caller's buffer goes to sendmsg as is
    errors = []

    def send():
        try:
            p.send_message(a, msg)
        except Exception as err:  # reported below, never dropped
            errors.append(err)

    sender = threading.Thread(target=send, name="test-sender-32MiB")
    sender.start()
    try:
        got = p.recv_message(b)
    finally:
        sender.join(timeout=20)
    assert not sender.is_alive() and not errors
    assert isinstance(got.data, memoryview)
    assert isinstance(got.data.obj, bytearray)  # a view of the receive buffer
    assert got.length == p.MAX_DATA
    assert hashlib.sha256(got.data).digest() == hashlib.sha256(data).digest()


def test_recv_on_stream_cut_inside_a_header(pair):
    a, b = pair
    a.sendall(p.encode(p.Ack(request_id=1))[:20])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(p.TruncatedFrame, match="20 of 48"):
        p.recv_message(b)


def test_recv_on_stream_cut_inside_a_payload(pair):
    a, b = pair
    a.sendall(p.encode(p.Write(request_id=1, volume=1, data=b"x" * 100))[:p.HEADER_SIZE + 60])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(p.TruncatedFrame, match="60 of 100"):
        p.recv_message(b)


def test_recv_reports_bad_header_before_reading_the_payload(pair):
    a, b = pair
    frame = bytearray(p.encode(p.Write(request_id=1, volume=1, data=b"x" * 100)))
    frame[0] = 0
    a.sendall(frame[:p.HEADER_SIZE])  # no payload sent: recv must not wait for it
    with pytest.raises(p.BadMagic):
        p.recv_message(b)


class TrickleSocket:
    """A fake socket whose recv_into hands out its bytes a few at a time."""

    def __init__(self, data: bytes, steps):
        self.data, self.steps, self.pos = data, steps, 0

    def recv_into(self, view):
        n = min(len(view), next(self.steps), len(self.data) - self.pos)
        view[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def test_recv_takes_a_frame_however_its_bytes_arrive_and_refuses_a_bad_one():
    """A frame read in pieces of any size decodes; one payload bit flipped
    is BadPayloadCRC."""
    rnd = random.Random(3)
    data = rnd.randbytes(300_000)
    frame = bytearray(p.encode(p.Write(request_id=1, volume=1, data=data)))
    steps = iter(lambda: rnd.choice([1, 13, 4096, 65536, 200_000]), None)
    got = p.recv_message(TrickleSocket(bytes(frame), steps))
    assert bytes(got.data) == data
    frame[p.HEADER_SIZE + 123_456] ^= 0x10
    with pytest.raises(p.BadPayloadCRC):
        p.recv_message(TrickleSocket(bytes(frame), steps))


def test_a_frame_reader_gives_back_the_stream_however_it_arrives_and_is_read():
    """FrameReader.read_into, bytes arriving in pieces of any size and read in
    views of any size (headers, short payloads, payloads around RECV_BUFFER
    and beyond it, which go straight into the view): the stream comes back
    as sent, and only the end of the stream makes a read short."""
    rnd = random.Random(8)
    big = p.RECV_BUFFER
    wire = rnd.randbytes(40 * big)
    wants = [p.HEADER_SIZE, 1, 4096, big - p.HEADER_SIZE, big - 1, big, big + 1, 3 * big + 5]
    for sizes in ([1, 7, 48, 4096], [big // 2, big, 3 * big], [1 << 30]):
        steps = iter(lambda: rnd.choice(sizes), None)
        reader = p.FrameReader(TrickleSocket(wire, steps))
        out, pos = bytearray(), 0
        while pos < len(wire):
            view = memoryview(bytearray(min(rnd.choice(wants), len(wire) - pos)))
            assert reader.read_into(view) == len(view)
            out += view
            pos += len(view)
        assert out == wire
        assert not reader.buffered()
        assert reader.read_into(memoryview(bytearray(10))) == 0       # the end
    reader = p.FrameReader(TrickleSocket(wire[:100], iter(lambda: 1 << 30, None)))
    assert reader.read_into(memoryview(bytearray(60))) == 60
    assert reader.read_into(memoryview(bytearray(60))) == 40          # cut short by the end


def test_a_frame_reader_takes_a_burst_in_one_recv_and_recv_message_reads_no_further(pair):
    """40 ACKs already in the socket: one recv for all of them through a
    FrameReader (two per frame without it).  ``recv_message`` itself reads
    no byte past its frame, which a handshake relies on (what follows it
    may be another reader's, or TLS)."""
    a, b = pair
    frames = [p.encode(p.Ack(request_id=i + 1)) for i in range(40)]
    a.sendall(b"".join(frames))
    assert p.recv_message(b).request_id == 1
    assert b.recv(4, socket.MSG_PEEK) == frames[1][:4]
    counted = CountingSocket(b)
    reader = p.FrameReader(counted)
    for frame in frames[1:]:
        view = memoryview(bytearray(len(frame)))
        assert reader.read_into(view) == len(frame) and view == frame
    assert counted.calls == 1 and not reader.buffered()


def test_crc32_combine_is_zlibs_crc_of_the_concatenation():
    rnd = random.Random(5)
    lengths = [0, 1, 2, 3, 4, 7, 255, 256, 4096, 65535, 65536, 65537, 1 << 20]
    for _ in range(300):
        a = rnd.randbytes(rnd.choice(lengths[:9]))
        b = rnd.randbytes(rnd.choice(lengths))
        assert p.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    pieces = [rnd.randbytes(65536) for _ in range(16)]
    crc = 0
    for piece in pieces:
        crc = p.crc32_combine(crc, zlib.crc32(piece), len(piece))
    assert crc == zlib.crc32(b"".join(pieces))


def test_crc32_pieces_gives_the_crc_of_the_whole_and_of_each_whole_piece():
    rnd = random.Random(6)
    for _ in range(300):
        data = rnd.randbytes(rnd.choice([0, 1, 4095, 4096, 65536, 65537, 200_000, 1 << 20]))
        size = rnd.choice([1, 3, 4096, 65536])
        first = rnd.randrange(0, 2 * size + 2)    # past the end of short data too
        crc, pieces = p.crc32_pieces(data, first, size)
        assert crc == zlib.crc32(data)
        assert pieces == [zlib.crc32(data[i:i + size])
                          for i in range(first, len(data) - size + 1, size)]


def test_decode_body_checks_the_crc_its_caller_computed():
    data = bytes(range(256)) * 4
    frame = p.encode(p.Write(request_id=3, volume=1, offset=0, data=data))
    header = p.parse_header(frame)
    payload = frame[p.HEADER_SIZE:]
    assert bytes(p.decode_body(header, payload, crc=zlib.crc32(data)).data) == data
    with pytest.raises(p.BadPayloadCRC):
        p.decode_body(header, payload, crc=zlib.crc32(data) ^ 1)


def test_encode_takes_a_payload_crc_the_sender_already_has():
    data = bytes(range(256)) * 16
    msg = p.RReadReply(request_id=2, volume=1, offset=0, data=data)
    assert b"".join(msg.encode(zlib.crc32(data))) == p.encode(msg)
    sock = ChoppySocket(1 << 20)
    p.send_message(sock, msg, zlib.crc32(data))
    assert bytes(sock.out) == p.encode(msg)


class ChoppySocket:
    """A fake socket that accepts at most ``step`` bytes per sendmsg call."""

    def __init__(self, step):
        self.step = step
        self.out = bytearray()

    def sendmsg(self, parts):
        joined = b"".join(bytes(x) for x in parts)[:self.step]
        self.out += joined
        return len(joined)


class TlsLikeSocket:
    """ssl.SSLSocket has no sendmsg: send_message must fall back to sendall."""

    def __init__(self):
        self.out = bytearray()

    def sendmsg(self, parts):
        raise NotImplementedError

    def sendall(self, data):
        self.out += data


@pytest.mark.parametrize("step", [1, 7, 48, 49, 1000])
def test_send_message_resumes_partial_sendmsg(step):
    msg = p.Write(request_id=3, volume=1, offset=512, data=bytes(range(256)) * 3)
    sock = ChoppySocket(step)
    p.send_message(sock, msg)
    assert bytes(sock.out) == p.encode(msg)


@pytest.mark.parametrize("step", [1, 49, 1 << 30])
def test_send_messages_sends_a_burst_in_order_in_few_calls(step):
    """A burst (ACKs, a SYNCED with a WRITE between) leaves in order, whatever
    each sendmsg takes; all at once when the socket takes it, in calls of at
    most SENDMSG_PARTS buffers; over TLS, part by part."""
    msgs = [p.Ack(request_id=i + 1) for i in range(2 * p.SENDMSG_PARTS)]
    msgs[5:5] = [p.Synced(request_id=9000, volume=1, offset=0, length=4096),
                 p.Write(request_id=9001, volume=1, offset=0, data=b"x" * 100)]
    calls = []

    class Counting(ChoppySocket):
        def sendmsg(self, parts):
            calls.append(len(parts))
            return super().sendmsg(parts)
    sock = Counting(step)
    p.send_messages(sock, msgs)
    assert bytes(sock.out) == b"".join(p.encode(m) for m in msgs)
    assert max(calls) <= p.SENDMSG_PARTS
    if step == 1 << 30:
        assert len(calls) == -(-(len(msgs) + 1) // p.SENDMSG_PARTS)   # the WRITE has 2 parts
    tls = TlsLikeSocket()
    p.send_messages(tls, msgs)
    assert bytes(tls.out) == bytes(sock.out)


def test_send_message_on_a_socket_without_sendmsg():
    msg = p.Checkpoint(request_id=4, name="cp1")
    sock = TlsLikeSocket()
    p.send_message(sock, msg)
    assert bytes(sock.out) == p.encode(msg)


# ---------------------------------------------------------------------------
# 3. Round-trip property tests


def _name(rng):
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
    n = rng.randint(0, p.MAX_NAME - 1)
    return rng.choice("abcXYZ019") + "".join(rng.choice(alphabet) for _ in range(n))


def _text(rng, limit):
    chars = "ab \u00e9\u2013\U0001f600\n"
    out = "".join(rng.choice(chars) for _ in range(rng.randint(0, 40)))
    return out.encode("utf-8")[:limit].decode("utf-8", "ignore")


def _u(rng, bits):
    return rng.choice([0, 1, (1 << bits) - 1, rng.getrandbits(bits)])


def _range(rng, max_len=None):
    length = rng.randint(1, max_len or p.MAX_VOLUME_SIZE // 2)
    offset = rng.randint(0, p.MAX_VOLUME_SIZE - length)
    return offset, length


def _data_msg(cls, rng, zero_flag=False):
    offset, _ = _range(rng, 1 << 20)
    common = dict(request_id=_u(rng, 64) or 1, volume=_u(rng, 32), offset=offset,
                  flags=rng.choice([0, 0x100, 0x8000]))
    if zero_flag and rng.random() < 0.3:
        return cls(length=rng.randint(1, p.MAX_DATA), **{**common, "flags": common["flags"] | p.FLAG_ZERO})
    return cls(data=rng.randbytes(rng.randint(1, 600)), **common)


def random_message(rng: random.Random, t: p.MsgType) -> p.Message:
    req, vol = _u(rng, 64), _u(rng, 32)
    if t in p.REQUESTS:
        req = req or 1   # a request's id is never 0 [RP-12]
    if t == p.MsgType.HELLO:
        lo = rng.randint(0, 255)
        return p.Hello(min_version=lo, max_version=rng.randint(lo, 255),
                       features=_u(rng, 32), nonce=rng.randbytes(32), agent_id=_name(rng))
    if t == p.MsgType.HELLO_REPLY:
        return p.HelloReply(version=_u(rng, 8), features=_u(rng, 32), nonce=rng.randbytes(32),
                            proof=rng.randbytes(32), hub_id=_name(rng))
    if t == p.MsgType.AUTH:
        return p.Auth(proof=rng.randbytes(32))
    if t == p.MsgType.ATTACH:
        return p.Attach(request_id=req, size=rng.randint(1, p.MAX_VOLUME_SIZE),
                        chunk_size=1 << rng.randint(12, 26),
                        state=rng.choice(list(p.VolumeState)),
                        generation=rng.randbytes(16), name=_name(rng))
    if t == p.MsgType.ATTACHED:
        return p.Attached(request_id=req, volume=vol, plan=rng.choice(list(p.SyncPlan)))
    if t in (p.MsgType.WRITE,):
        return _data_msg(p.Write, rng)
    if t in (p.MsgType.READ_REPLY, p.MsgType.RREAD_REPLY, p.MsgType.RWRITE, p.MsgType.PUT):
        return _data_msg(p.message_class(t), rng, zero_flag=True)
    if t in (p.MsgType.READ, p.MsgType.RREAD):
        offset, length = _range(rng, p.MAX_DATA)
        return p.message_class(t)(request_id=req, volume=vol, offset=offset, length=length)
    if t in (p.MsgType.ZERO, p.MsgType.SYNCED, p.MsgType.EXTENT_QUERY):
        offset, length = _range(rng)
        return p.message_class(t)(request_id=req, volume=vol, offset=offset, length=length)
    if t == p.MsgType.DIRTY_MAP:
        extents, pos = [], 0
        for _ in range(rng.randint(0, 20)):
            pos += rng.randint(0, 1 << 30)
            n = rng.randint(1, 1 << 30)
            extents.append((pos, n))
            pos += n
        return p.DirtyMap(request_id=req, volume=vol, extents=extents)
    if t in (p.MsgType.CHECKSUM_QUERY, p.MsgType.CHECKSUMS):
        chunk = 1 << rng.randint(12, 20)
        length = rng.randint(1, chunk * 40)
        offset = rng.randint(0, 1 << 40)
        kw = dict(request_id=req, volume=vol, offset=offset, length=length, chunk_size=chunk)
        if t == p.MsgType.CHECKSUMS:
            kw["digests"] = [rng.randbytes(32) for _ in range(-(-length // chunk))]
        return p.message_class(t)(**kw)
    if t == p.MsgType.EXTENTS:
        offset, length = _range(rng)
        extents, left = [], length
        for _ in range(rng.randint(1, 20)):
            if not left:
                break
            n = rng.randint(1, left)
            extents.append((n, rng.choice((0, p.EXTENT_ZERO))))
            left -= n
        return p.Extents(request_id=req, volume=vol, offset=offset, length=length,
                         extents=extents)
    if t == p.MsgType.FAILBACK_END:
        return p.FailbackEnd(request_id=req, volume=vol,
                             outcome=rng.choice(list(p.FailbackOutcome)))
    if t == p.MsgType.CHECKPOINT:
        return p.Checkpoint(request_id=req, name=_name(rng))
    if t == p.MsgType.RECOVER_OPEN:
        return p.RecoverOpen(request_id=req, mode=rng.choice(list(p.RecoverMode)),
                             name=_name(rng), point=rng.choice(["latest", "cp-1",
                                                                "2026-11-25T18:00:00Z"]))
    if t == p.MsgType.RECOVER_READY:
        return p.RecoverReady(request_id=req, volume=vol, size=_u(rng, 64),
                              point_time_ns=_u(rng, 64))
    if t == p.MsgType.PING:
        return p.Ping(request_id=req, sent_ns=_u(rng, 64))
    if t == p.MsgType.PONG:
        return p.Pong(request_id=req, echo_ns=_u(rng, 64), responder_ns=_u(rng, 64))
    if t == p.MsgType.ERROR:
        return p.Error(request_id=req, code=_u(rng, 32), failed_type=_u(rng, 8),
                       message=_text(rng, p.MAX_TEXT))
    if t == p.MsgType.GOODBYE:
        return p.Goodbye(reason=_text(rng, p.MAX_TEXT))
    cls = p.message_class(t)
    kw = {name: (req if name == "request_id" else vol) for name in cls.HEADER_FIELDS}
    return cls(**kw)


def test_random_messages_of_every_type_round_trip():
    rng = random.Random(20261125)
    types = list(p.MsgType)
    messages = [random_message(rng, types[i % len(types)]) for i in range(2000)]
    stream = bytearray()
    for msg in messages:
        raw = p.encode(msg)
        back = p.decode(raw)
        assert back.fields() == msg.fields(), msg.describe()
        assert p.encode(back) == raw
        again = p.message_from_fields(msg.TYPE.name, json.loads(json.dumps(msg.fields())))
        assert p.encode(again) == raw
        stream += raw
    dec = p.Decoder()
    got, pos = [], 0
    while pos < len(stream):  # bounded: pos grows by at least 1 each turn
        step = rng.randint(1, 5000)
        dec.feed(stream[pos:pos + step])
        pos += step
        got.extend(dec)
    dec.close()
    assert [m.fields() for m in got] == [m.fields() for m in messages]


def test_random_corruption_never_escapes_the_error_tree():
    """Flip random bits of valid frames: the decoder either decodes something
    or raises a ReplicationError, never anything else."""
    rng = random.Random(7)
    frames = [v["bytes"] for v in VALID]
    for _ in range(2000):
        raw = bytearray(rng.choice(frames))
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        try:
            p.decode(raw)
        except p.ReplicationError:
            pass


def test_payload_fuzz_behind_a_valid_header_stays_in_the_error_tree():
    """Random payloads with correct CRCs reach every payload parser."""
    rng = random.Random(11)
    for i in range(2000):
        t = list(p.MsgType)[i % len(p.MsgType)]
        payload = rng.randbytes(rng.choice([0, 1, 4, 8, 16, 40, 44, 80]))
        cls = p.message_class(t)
        kw = {f: rng.choice([0, 1, 4096]) for f in cls.HEADER_FIELDS}
        if t in p.REQUESTS:
            kw["request_id"] = rng.choice([1, 4096])
        body = p.encode_header(t, 0, kw.get("request_id", 0), kw.get("volume", 0),
                               len(payload), kw.get("offset", 0), kw.get("length", 0),
                               zlib.crc32(payload))
        try:
            msg = p.decode(bytes(body) + payload)
        except p.RequestError:
            continue
        assert p.encode(msg) == bytes(body) + payload


# ---------------------------------------------------------------------------
# 4. Handshake


def _hs():
    h = HANDSHAKE
    return (bytes.fromhex(h["secret"]), bytes.fromhex(h["agent_nonce"]),
            bytes.fromhex(h["hub_nonce"]), h["agent_id"], h["hub_id"])


def test_handshake_proofs_match_the_vectors():
    secret, na, nh, aid, hid = _hs()
    assert p.hub_proof(secret, na, nh, aid, hid).hex() == HANDSHAKE["hub_proof"]
    assert p.agent_proof(secret, na, nh, aid, hid).hex() == HANDSHAKE["agent_proof"]
    # The transcript layout, spelled out as PROTOCOL.md states it.
    def transcript(label):
        return (label + na + nh + struct.pack("!H", len(aid)) + aid.encode()
                + struct.pack("!H", len(hid)) + hid.encode())
    assert transcript(b"RPL1 hub proof").hex() == HANDSHAKE["hub_transcript"]
    assert transcript(b"RPL1 agent proof").hex() == HANDSHAKE["agent_transcript"]
    import hmac
    assert hmac.new(secret, transcript(b"RPL1 agent proof"), "sha256").hexdigest() \
        == HANDSHAKE["agent_proof"]


def test_handshake_frames_carry_the_proofs():
    secret, na, nh, aid, hid = _hs()
    frames = {v["name"]: p.decode(v["bytes"]) for v in p.load_vectors(VECTORS / "handshake.json")}
    hello, reply, auth = frames["hello"], frames["hello_reply"], frames["auth"]
    assert hello.nonce == na and hello.agent_id == aid
    assert p.proof_matches(p.hub_proof(secret, hello.nonce, reply.nonce, hello.agent_id,
                                       reply.hub_id), reply.proof)
    assert p.proof_matches(p.agent_proof(secret, hello.nonce, reply.nonce, hello.agent_id,
                                         reply.hub_id), auth.proof)
    assert isinstance(frames["auth_ok"], p.AuthOk)


def test_replayed_agent_proof_fails_against_a_fresh_hub_nonce():
    secret, na, nh, aid, hid = _hs()
    recorded = p.agent_proof(secret, na, nh, aid, hid)
    fresh_nh = bytes(32)
    assert p.agent_proof(secret, na, fresh_nh, aid, hid) != recorded
    assert not p.proof_matches(p.agent_proof(secret, na, fresh_nh, aid, hid), recorded)
    # A hub proof cannot be reflected as an agent proof (different labels).
    assert not p.proof_matches(p.hub_proof(secret, na, nh, aid, hid), recorded)


def test_wrong_secret_or_identity_fails():
    secret, na, nh, aid, hid = _hs()
    good = p.agent_proof(secret, na, nh, aid, hid)
    other = bytes(31) + b"\x01"
    assert not p.proof_matches(p.agent_proof(other, na, nh, aid, hid), good)
    assert not p.proof_matches(p.agent_proof(secret, na, nh, "agent-2", hid), good)
    assert not p.proof_matches(p.agent_proof(secret, na, nh, aid, "hub-2"), good)
    assert p.proof_matches(good, bytearray(good))


def test_parse_secret():
    assert p.parse_secret(" " + "ab" * 32 + "\n") == b"\xab" * 32
    with pytest.raises(ValueError, match="not a hex"):
        p.parse_secret("zz" * 32)
    with pytest.raises(ValueError, match="at least 16"):
        p.parse_secret("ab" * 15)


# ---------------------------------------------------------------------------
# 5. Encoder-side checks and helpers


def test_message_types_are_partitioned_by_direction():
    sets = (p.AGENT_TO_HUB, p.HUB_TO_AGENT, p.BOTH_WAYS)
    assert set().union(*sets) == set(p.MsgType)
    assert sum(len(s) for s in sets) == len(p.MsgType)


def test_encoder_refuses_what_the_decoder_would_reject():
    with pytest.raises(p.PayloadTooLarge):
        p.Write(request_id=1, volume=1, data=memoryview(bytearray(p.MAX_PAYLOAD + 1))).encode()
    with pytest.raises(p.InvalidField, match="nonce is 5 bytes"):
        p.encode(p.Hello(nonce=b"short", agent_id="a"))
    with pytest.raises(p.InvalidField, match="generation"):
        p.encode(p.Attach(request_id=1, size=1, generation=b"x" * 17, name="d"))
    with pytest.raises(p.InvalidField, match="digest"):
        p.encode(p.Checksums(request_id=1, volume=1, length=4096, chunk_size=4096,
                             digests=[b"x"]))
    with pytest.raises(p.InvalidField, match="volume name"):
        p.encode(p.Attach(request_id=1, size=1, name="d" * (p.MAX_NAME + 1)))
    with pytest.raises(p.InvalidField, match="header field out of range"):
        p.encode(p.Ack(request_id=1 << 64))


def test_long_texts_are_clipped_on_utf8_boundaries():
    msg = p.Error(request_id=1, code=p.ErrorCode.IO_ERROR, message="\u00e9" * p.MAX_TEXT)
    back = p.decode(p.encode(msg))
    assert back.message == "\u00e9" * (p.MAX_TEXT // 2)
    back = p.decode(p.encode(p.Goodbye(reason="\U0001f600" * 300)))
    assert back.reason == "\U0001f600" * (p.MAX_TEXT // 4)


def test_goodbye_code_only_where_granted_and_unknown_codes_read_unspecified():
    """PROTOCOL.md [LV-5]: the code follows the reason only with GOODBYE_CODE."""
    plain = p.Goodbye.for_features(p.Feature.FAILBACK, "bye", p.GoodbyeCode.FAILED_BACK)
    assert plain.code is None and p.encode(plain) == p.encode(p.Goodbye(reason="bye"))
    assert p.decode(p.encode(plain)).reason_code() == p.GoodbyeCode.UNSPECIFIED
    coded = p.Goodbye.for_features(p.Feature.GOODBYE_CODE, "bye", p.GoodbyeCode.FAILED_BACK)
    back = p.decode(p.encode(coded))
    assert back.code == p.GoodbyeCode.FAILED_BACK and back.reason == "bye"
    assert len(p.encode(coded)) == len(p.encode(plain)) + 4
    later = p.decode(p.encode(p.Goodbye(reason="", code=250)))
    assert later.code == 250 and later.reason_code() == p.GoodbyeCode.UNSPECIFIED


def test_error_from_exception_and_describe():
    err = p.OutOfRange("past the end", request_id=5, msg_type=p.MsgType.WRITE)
    msg = p.Error.from_exception(err)
    assert (msg.code, msg.request_id, msg.failed_type) == (p.ErrorCode.OUT_OF_RANGE, 5,
                                                           p.MsgType.WRITE)
    assert msg.describe() == "ERROR req=5 code=OUT_OF_RANGE 'past the end'"
    assert p.Error(code=12345).code_name() == "12345"
    app = p.RequestError("not yours", code=p.ErrorCode.NOT_OWNER)
    assert p.Error.from_exception(app).code == p.ErrorCode.NOT_OWNER
    assert p.Error.from_exception(p.BadMagic("x")).code == p.ErrorCode.PROTOCOL
    w = p.Write(request_id=7, volume=1, offset=4096, data=b"x" * 65536, flags=0x100)
    assert w.describe() == "WRITE req=7 vol=1 off=4096 len=65536 flags=0x100"
    assert p.ReadReply(request_id=1, volume=1, length=4, flags=p.FLAG_ZERO).is_zero
    assert not p.ReadReply(request_id=1, volume=1, data=b"x").is_zero


def test_decode_refuses_bytes_after_the_frame_and_short_payloads():
    raw = p.encode(p.Ack(request_id=1))
    with pytest.raises(p.InvalidField, match="1 bytes after"):
        p.decode(raw + b"\x00")
    header = p.parse_header(p.encode(p.Ping(request_id=1, sent_ns=5)))
    with pytest.raises(p.TruncatedFrame, match="payload is 3 bytes"):
        p.decode_body(header, b"abc")
    with pytest.raises(p.TruncatedFrame, match="header is 3 bytes"):
        p.parse_header(b"abc")


def test_decoder_after_a_protocol_error_stays_broken_and_can_be_fed():
    dec = p.Decoder()
    dec.feed(b"\x00" * p.HEADER_SIZE)
    with pytest.raises(p.BadMagic):
        dec.next_message()
    dec.feed(p.encode(p.Ack(request_id=1)))  # must not raise BufferError
    with pytest.raises(p.BadMagic):
        dec.next_message()


def test_validate_name_and_check_range():
    assert p.validate_name("disk-0.img_1") == "disk-0.img_1"
    for bad in ("", ".hidden", "a/b", "a\x00", "\u00e9t\u00e9", "a" * (p.MAX_NAME + 1)):
        with pytest.raises(p.InvalidField) as info:
            p.validate_name(bad)
        assert info.value.code == p.ErrorCode.BAD_NAME
    p.check_range(4096, 4096, 8192)
    with pytest.raises(p.OutOfRange, match="ends at 8193, past the volume's end 8192"):
        p.check_range(4097, 4096, 8192)


def test_message_from_fields_defaults_and_every_class_is_registered():
    for t in p.MsgType:
        cls = p.message_class(t)
        assert cls.TYPE == t and dataclasses.is_dataclass(cls)
    msg = p.message_from_fields("ATTACH", {"request_id": 1, "state": "DIRTY", "name": "d",
                                           "size": 1})
    assert msg.state is p.VolumeState.DIRTY and msg.chunk_size == 65536


def test_errors_name_the_field_the_value_and_the_expectation():
    frame = bytearray(p.encode(p.Ack(request_id=1)))
    frame[0] ^= 0xFF
    with pytest.raises(p.BadMagic, match="bad magic 0xad504c31, expected 0x52504c31"):
        p.decode(frame)
    raw = bytes.fromhex(next(v for v in MALFORMED if v["name"] == "volume_unused")["hex"])
    with pytest.raises(p.InvalidField, match="ACK header field volume is 7, expected 0"):
        p.decode(raw)


def test_protocol_md_clause_index_and_worked_example_match():
    import re
    text = (pathlib.Path(__file__).resolve().parent.parent / "PROTOCOL.md").read_text(
        encoding="utf-8")
    body, index = text.split("## Clause index")
    used = set(re.findall(r"\[([A-Z]{2}-\d+)\]", body))
    listed = re.findall(r"^\| ([A-Z]{2}-\d+) \|", index, re.M)
    assert len(listed) == len(set(listed))
    assert used == set(listed)
    example = body.split("## Worked example")[1].split("## Test vectors")[0]
    dumped = bytes.fromhex("".join(
        m.group(1) for m in re.finditer(r"^[0-9a-f]{4}  ((?:[0-9a-f]{2} ?){1,16})", example,
                                        re.M)).replace(" ", ""))
    assert dumped == b"".join(v["bytes"] for v in p.load_vectors(VECTORS / "handshake.json"))
    assert HANDSHAKE["hub_proof"] in example and HANDSHAKE["agent_proof"] in example


def test_write_built_in_code_is_checked_like_a_decoded_one():
    with pytest.raises(p.InvalidField, match="WRITE length 5 != payload length 1"):
        p.Write(request_id=1, volume=1, length=5, data=b"x").check()
    with pytest.raises(p.InvalidField, match="WRITE length is 0"):
        p.Write(request_id=1, volume=1).check()


def test_decoder_receives_large_payloads_into_their_own_buffer():
    """Payloads >= DIRECT_PAYLOAD fed in pieces are copied once, into a
    buffer the message keeps; a bad large frame is consumed whole."""
    rng = random.Random(3)
    big = rng.randbytes(p.Decoder.DIRECT_PAYLOAD * 3 + 5)
    bad = bytearray(p.encode(p.Write(request_id=8, volume=1, data=big)))
    struct.pack_into("!Q", bad, 32, 4096)  # length != payload: InvalidField
    struct.pack_into("!I", bad, 44, zlib.crc32(bad[:44]))
    frames = [p.encode(p.Write(request_id=7, volume=1, offset=512, data=big)),
              p.encode(p.Ack(request_id=1)), bytes(bad), p.encode(p.Ping(request_id=2))]
    stream = b"".join(frames)
    for _ in range(20):
        dec = p.Decoder()
        got, errors, pos = [], [], 0
        while pos < len(stream):
            step = rng.choice([1, 47, 48, 49, 4096, 70000, 300000])
            dec.feed(bytearray(stream[pos:pos + step]))
            pos += step
            while True:
                try:
                    msg = dec.next_message()
                except p.RequestError as err:
                    errors.append(err)
                    continue
                if msg is None:
                    break
                got.append(msg)
        dec.close()
        assert [m.TYPE for m in got] == [p.MsgType.WRITE, p.MsgType.ACK, p.MsgType.PING]
        assert bytes(got[0].data) == big and isinstance(got[0].data.obj, (bytes, bytearray))
        assert [(type(e), e.request_id) for e in errors] == [(p.InvalidField, 8)]
    dec = p.Decoder()
    dec.feed(frames[0][:p.HEADER_SIZE + 1000])
    assert dec.next_message() is None and dec.pending() == 1000
    with pytest.raises(p.TruncatedFrame, match="1000 bytes left over"):
        dec.close()


def test_is_zero_finds_a_single_data_byte_anywhere():
    """FLAG_ZERO may be used only when every byte is zero, across piece boundaries."""
    size = 3 * 1024 * 1024 + 5
    assert p.is_zero(b"") and p.is_zero(bytes(size)) and p.is_zero(bytearray(7))
    for where in (0, 1024 * 1024 - 1, 1024 * 1024, size - 1):
        data = bytearray(size)
        data[where] = 1
        assert not p.is_zero(data), where


def test_answered_by_is_the_column_of_protocol_md():
    """protocol.ANSWERED_BY (from which REQUESTS and ANSWERS derive) is
    PROTOCOL.md "Message types", column "answered by", after the handshake."""
    spec = (pathlib.Path(__file__).parent.parent / "PROTOCOL.md").read_text()
    rows = re.findall(r"^\| `0x[0-9a-f]{2}` \| `(\w+)` \| [A/H]+ \| [^|]+ \| ([\w–]+) \|$",
                      spec, re.M)
    assert len(rows) == len(p.MsgType), rows
    column = {p.MsgType[name]: p.MsgType[answer] for name, answer in rows
              if answer != "–" and name not in ("HELLO", "HELLO_REPLY", "AUTH")}
    assert p.ANSWERED_BY == column


def test_volume_rules_are_the_tables_of_protocol_md():
    """protocol.VOLUME_RULES is PROTOCOL.md "Volume phases": per receiver, the
    messages, the phases that take them and the error for the other phases."""
    spec = (pathlib.Path(__file__).parent.parent / "PROTOCOL.md").read_text()
    section = spec[spec.index("### Volume phases"):spec.index("## Replication")]
    rows = re.findall(r"^\| (hub|agent) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", section, re.M)
    assert len(rows) == 7, rows
    tables: dict = {p.Side.HUB: {}, p.Side.AGENT: {}}
    for receiver, messages, taken, otherwise in rows:
        phases = frozenset(p.VolumePhase(name) for name in re.findall(r"`([a-z-]+)`", taken))
        codes = [c for c in re.findall(r"\b[A-Z_]+\b", otherwise) if c in p.ErrorCode.__members__]
        code = next((c for c in reversed(codes) if c != "NO_SUCH_VOLUME"), codes[0])
        for name in re.findall(r"\b[A-Z_]+\b", messages.split(" with ")[0]):
            tables[p.Side(receiver)][p.MsgType[name]] = (phases, p.ErrorCode[code])
    assert p.VOLUME_RULES == tables


@pytest.mark.parametrize("phase", list(p.VolumePhase))
def test_check_volume_phase_refuses_with_the_tables_code(phase):
    for receiver, rules in p.VOLUME_RULES.items():
        for msg_type, (taken, code) in rules.items():
            msg = p.message_class(msg_type)(request_id=1, volume=7)
            if phase in taken:
                p.check_volume_phase(msg, receiver, phase, "volume v")
                continue
            with pytest.raises(p.RequestError) as err:
                p.check_volume_phase(msg, receiver, phase, "volume v")
            want = p.ErrorCode.NO_SUCH_VOLUME if phase is p.VolumePhase.NONE else code
            assert err.value.code == want, (receiver, msg_type, phase)
            assert "volume v" in str(err.value)
