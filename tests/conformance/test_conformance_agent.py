"""Agent direction: the suite plays the hub and judges the agent that connects.

One SpecHub per module listens (``--agent-listen`` or 127.0.0.1:0 with the
reference agent started by the suite); tests take the current connection
(``rig.session``) or cut it and wait for the agent to come back.  Guest
writes go through the protected disk's NBD export (the reference QSD's, or
``--agent-nbd``); tests that need them skip without one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import threading
import time
from pathlib import Path

import pytest

import cf_codec
from cf_codec import (CODE_NAMES, FEATURE_TYPES, FLAG_ZERO, NEVER_ANSWERED, PHASE_PROBES,
                      TYPE_VALUES, VOLUME_PHASES, Msg, msg, raw_frame)
from cf_peers import Closed, SpecHub, wait_until

clause = pytest.mark.clause
VECTORS = Path(__file__).resolve().parents[1] / "vectors"
T = 10.0
RECONNECT = 30.0


def ref_bug(reason: str):
    """A known failure of repagent.py: strict xfail when the reference agent is judged."""
    return pytest.mark.xfail("config._cf_setup.ref_agent", strict=True, reason=reason)


class Rig:
    """The SpecHub, the agent under test and the current connection."""

    def __init__(self, hub: SpecHub, agent):
        self.hub, self.agent = hub, agent
        self.session = None
        self.attach: Msg | None = None

    def connect(self, **hs):
        self.session = self.hub.session(timeout=RECONNECT, **hs)
        self.attach = self.session.wait_for(lambda f: isinstance(f, Msg) and f.type == "ATTACH",
                                            T, "ATTACH")
        return self.session

    def reconnect(self, **hs):
        if self.session is not None:
            self.session.drop()
        return self.connect(**hs)

    @property
    def vid(self) -> int:
        return self.session.volume_id(self.attach.name)

    @property
    def size(self) -> int:
        return self.attach.size

    def need_writes(self):
        if not getattr(self.agent, "can_write", False):
            pytest.skip("needs guest writes: give --agent-nbd URI of the protected disk")

    def write_seen(self, offset: int, data: bytes, timeout=T) -> Msg:
        """Write through the guest path; return the WRITE frame that carries it."""
        start = len(self.session.frames("WRITE"))
        self.agent.guest_write(offset, data)
        return self.session.wait_for(
            lambda f: isinstance(f, Msg) and f.type == "WRITE" and f.offset <= offset
            < f.offset + f.length and f in self.session.frames("WRITE")[start:], timeout,
            f"WRITE at {offset}")

    def alive(self) -> None:
        """The connection still works: PING gets PONG [LV-1]."""
        pong = self.session.request(msg("PING", sent_ns=777))
        assert pong.type == "PONG" and pong.echo_ns == 777


@pytest.fixture(scope="module")
def rig(agent_target, codec):
    hub = SpecHub(agent_target.listen, agent_target.agent_id, agent_target.secret, codec)
    agent_target.start(hub.address)
    r = Rig(hub, agent_target)
    try:
        r.connect()
        yield r
    finally:
        if r.session is not None:
            r.session.drop()
        hub.close()


@pytest.fixture
def s(rig):
    """The current, healthy connection (reconnected if a test cut it)."""
    rig.hub.heal = True
    if rig.session is None or rig.session.closed.is_set():
        rig.connect()
    rig.session.ack_policy = "auto"
    return rig.session


def error_of(m) -> str:
    assert isinstance(m, Msg) and m.type == "ERROR", f"expected ERROR, got {m}"
    return CODE_NAMES.get(int(m.code), str(m.code))


def covers(extents, offset, length) -> bool:
    return any(o <= offset and offset + length <= o + n for o, n in extents) or \
        _union_covers(extents, offset, offset + length)


def _union_covers(extents, start, end) -> bool:
    pos = start
    for o, n in sorted(extents):
        if o <= pos < o + n:
            pos = o + n
    return pos >= end


# ---------------------------------------------------------------------------
# Handshake


@clause("HS-1", "HS-2", "HS-5", "VN-1", "FR-1", "FR-3", "FR-15", "VN-5")
def test_agent_handshake(rig, s):
    hello = s.hello
    assert hello.type == "HELLO", "the agent's first frame is HELLO [HS-1]"
    assert hello.min_version <= 1 <= hello.max_version
    assert len(hello.nonce) == 32 and any(hello.nonce)
    assert s.auth.type == "AUTH"    # verified against the secret by SpecHub [HS-5]
    first = bytes(hello.nonce)
    s2 = rig.reconnect()
    assert bytes(s2.hello.nonce) != first, "nonce_a fresh for every connection [HS-2]"


@clause("HS-6")
def test_agent_refuses_a_bad_hub_proof(rig, s):
    s.drop()
    sess = rig.hub.accept(RECONNECT)
    try:
        assert not sess.handshake(bad_proof=True)
        assert sess.auth is not None and sess.auth.type == "ERROR", \
            f"expected ERROR(AUTH_FAILED) and no AUTH, got {sess.auth} [HS-6]"
        assert error_of(sess.auth) == "AUTH_FAILED"
        assert sess.conn.recv_until_close(T) == [], "nothing after ERROR: close [HS-6]"
    finally:
        sess.conn.close()
    rig.connect()


@clause("HS-4")
def test_agent_refuses_a_version_outside_its_range(rig, s):
    s.drop()
    sess = rig.hub.accept(RECONNECT)
    try:
        assert not sess.handshake(version=s.hello.max_version + 1)
        assert sess.auth is not None and error_of(sess.auth) == "VERSION", \
            f"expected ERROR(VERSION), got {sess.auth} [HS-4]"
    finally:
        sess.conn.close()
        rig.connect()


@clause("VN-4")
def test_agent_refuses_an_unoffered_feature(rig, s):
    offered = s.hello.features
    bit = next(1 << i for i in range(32) if not offered & (1 << i))
    s.drop()
    sess = rig.hub.accept(RECONNECT)
    try:
        sess.handshake(features=bit)
        first = sess.auth
        if first is not None and first.type == "AUTH":
            first = sess.conn.recv(T) if not sess.conn.eof else None
        assert first is not None and first.type == "ERROR" and error_of(first) == "UNSUPPORTED", \
            f"granted feature 0x{bit:x} not offered: expected ERROR(UNSUPPORTED) [VN-4]"
    except Closed:
        pytest.fail("closed without ERROR(UNSUPPORTED) [VN-4]")
    finally:
        sess.conn.close()
        rig.connect()


# ---------------------------------------------------------------------------
# Volumes and requests


@clause("VO-2", "VO-1")
def test_attach_fields_and_generation(rig, s):
    att = rig.attach
    c = att.chunk_size
    assert 4096 <= c <= 1 << 26 and c & (c - 1) == 0
    assert len(att.generation) == 16 and 0 < att.size
    gen = bytes(att.generation)
    rig.reconnect()
    assert bytes(rig.attach.generation) == gen, "same state, same generation [VO-2]"


@clause("SY-5", "SY-6", "RP-9")
def test_read_answers(rig, s):
    rig.need_writes()
    data = os.urandom(3 * 4096)
    rig.write_seen(65536, data)
    r = s.request(msg("READ", volume=rig.vid, offset=65536 - 4096, length=5 * 4096))
    assert (r.type, r.request_id, r.volume, r.offset, r.length) == \
        ("READ_REPLY", r.request_id, rig.vid, 65536 - 4096, 5 * 4096), "echo [SY-5]"
    assert not r.flags & FLAG_ZERO and len(r.data) == r.length, "[RP-9]"
    assert bytes(r.data) == rig.agent.guest_read(65536 - 4096, 5 * 4096)
    assert bytes(r.data)[4096:4 * 4096] == data
    hole = rig.size - 8192
    if any(rig.agent.guest_read(hole, 8192)):
        pytest.skip("the end of the disk is not zero")
    z = s.request(msg("READ", volume=rig.vid, offset=hole, length=8192))
    if z.flags & FLAG_ZERO:
        assert len(z.data) == 0, "FLAG_ZERO with an empty payload [SY-6]"
    else:
        assert bytes(z.data) == bytes(8192)
    # FLAG_ZERO only when the whole range is zero [SY-6]
    r = s.request(msg("READ", volume=rig.vid, offset=65536, length=4096))
    assert not r.flags & FLAG_ZERO


@clause("SY-5", "SY-11", "SY-3")
def test_checksums(rig, s):
    length = 5 * 65536 + 4096      # the last piece is shorter
    q = s.request(msg("CHECKSUM_QUERY", volume=rig.vid, offset=0, length=length,
                      chunk_size=65536, algorithm=1))
    assert q.type == "CHECKSUMS" and (q.volume, q.offset, q.length, q.chunk_size) == \
        (rig.vid, 0, length, 65536), "echo [SY-5]"
    assert len(q.digests) == 6, "one digest per piece [SY-11]"
    if getattr(rig.agent, "can_write", False):
        disk = rig.agent.guest_read(0, length)
        want = [hashlib.sha256(disk[i:i + 65536]).digest() for i in range(0, length, 65536)]
        assert [bytes(d) for d in q.digests] == want


@clause("SY-10")
def test_checksum_query_too_large(rig, s):
    pieces = (cf_codec.MAX_PAYLOAD - 8) // 32 + 1
    m = s.request(msg("CHECKSUM_QUERY", volume=rig.vid, offset=0, length=pieces * 4096,
                      chunk_size=4096, algorithm=1))
    assert error_of(m) in ("INVALID",), "[SY-10]"
    rig.alive()


@clause("VO-6", "RP-4", "FR-16", "ER-5", "FR-13", "FR-7", "ER-2")
def test_error_replies(rig, s):
    cases = [
        (msg("READ", request_id=501, volume=0x7FFF0000, offset=0, length=4096), {"NO_SUCH_VOLUME"}),
        (msg("READ", request_id=502, volume=rig.vid, offset=rig.size, length=4096),
         {"OUT_OF_RANGE"}),
        (raw_frame(0x7D, b"abc", request_id=503), {"UNSUPPORTED"}),
        (msg("WRITE", request_id=504, volume=rig.vid, offset=0, data=b"x"), {"UNSUPPORTED"}),
        (raw_frame(TYPE_VALUES["PING"], struct.pack("!Q", 1), request_id=505, flags=1 << 4),
         {"UNSUPPORTED"}),
        (raw_frame(TYPE_VALUES["DIRTY_QUERY"], request_id=506, volume=rig.vid, offset=4096),
         {"INVALID"}),
    ]
    for frame, codes in cases:
        req, kind = s.conn.send_frame(frame)
        err = s.wait_for(lambda f: isinstance(f, Msg) and f.request_id == req
                         and f.type in ("ERROR", "READ_REPLY", "PONG", "DIRTY_MAP"), T, f"answer {req}")
        assert error_of(err) in codes, f"req {req}: {err}"
        assert int(err.failed_type) == kind, "[ER-2]"
    rig.alive()


@clause("VO-6")
def test_every_volume_request_names_no_attached_volume(rig, s):
    """Phase ``none`` of every agent row of "Volume phases" (the rows of a
    feature this session granted): a volume id the agent has not attached
    is NO_SUCH_VOLUME."""
    for i, name in enumerate(sorted(VOLUME_PHASES["A"])):
        feature = FEATURE_TYPES.get(name)
        if feature is not None and not s.features & cf_codec.FEATURES[feature]:
            continue
        probe = PHASE_PROBES[name](0x7FFF0200 + i)
        probe.request_id = 700 + i
        err = s.request(probe)
        assert error_of(err) == "NO_SUCH_VOLUME", f"{name} for no volume: {err}"
    rig.alive()


@clause("VN-6", "ER-7", "RP-12", "ER-3")
def test_spec_gap_answers(rig, s):
    """A message of a feature not granted is UNSUPPORTED [VN-6]; an answer to
    no request of the agent's is INVALID [ER-7] (an ACK of nothing is dropped,
    [ER-3]); and both leave the session up."""
    if s.features & cf_codec.FEATURES["FAILBACK"]:
        pytest.skip("this session granted FAILBACK")
    cases = [
        (msg("FAILBACK_BEGIN", request_id=601, volume=rig.vid), "UNSUPPORTED"),
        (msg("PUT", request_id=602, volume=rig.vid, offset=0, data=b"x" * 512), "UNSUPPORTED"),
        (msg("ATTACHED", request_id=603, volume=9, plan="NONE"), "INVALID"),
        (msg("RECOVER_READY", request_id=604, volume=9, size=1, point_time_ns=1), "INVALID"),
        (msg("RREAD_REPLY", request_id=605, volume=9, offset=0, data=b"y" * 512), "INVALID"),
    ]
    for frame, code in cases:
        req, kind = s.conn.send_frame(frame)
        err = s.wait_for(lambda f: isinstance(f, Msg) and f.request_id == req
                         and f.type in ("ERROR", "ACK"), T, f"answer {req}")
        assert error_of(err) == code, f"req {req}: {err}"
        assert int(err.failed_type) == kind, "[ER-2]"
    rig.alive()


@clause("LV-1")
def test_agent_ping(rig, s):
    for req in (1, (1 << 64) - 1):
        pong = s.request(msg("PING", request_id=req, sent_ns=123456789))
        assert pong.type == "PONG" and pong.request_id == req and pong.echo_ns == 123456789


@clause("ER-3", "ER-4")
def test_agent_never_answers_these_with_error(rig, s):
    before = len(s.frames("ERROR"))
    s.conn.send(msg("ACK", request_id=987654))
    s.conn.send(msg("PONG", request_id=987655, echo_ns=1, responder_ns=2))
    s.conn.send(msg("ERROR", request_id=987656, code=999, failed_type=0x20, message="?"))
    s.conn.send(msg("SYNCED", request_id=987657, volume=rig.vid, offset=0, length=4096))
    rig.alive()
    assert s.frames("ERROR")[before:] == [], "ERROR/ACK/PONG/SYNCED never answered with ERROR [ER-3]"


@clause("ER-3")
def test_agent_never_answers_malformed_ack_with_error(rig, s):
    before = len(s.frames("ERROR"))
    s.conn.send_raw(raw_frame(TYPE_VALUES["ACK"], b"x", request_id=987658))
    rig.alive()
    assert s.frames("ERROR")[before:] == [], "a malformed ACK is not answered with ERROR [ER-3]"


# ---------------------------------------------------------------------------
# Dirty tracking across ACK withholding and disconnects


@clause("RP-8", "SY-14", "LV-3", "SY-8", "SY-7", "VO-1")
def test_ack_withholding_keeps_the_region_dirty(rig, s):
    rig.need_writes()
    rig.hub.heal = False        # nothing may clear the marks but the agent's own rules
    s.ack_policy = "hold"
    off = 12 * 65536 + 4096
    rig.write_seen(off, b"\x5a" * 8192)
    rig.reconnect()                                   # the WRITE never got its ACK
    assert rig.attach.state != cf_codec.ENUMS["state"]["CLEAN"], \
        "un-ACKed writes: ATTACH must not say CLEAN [VO-1, RP-8]"
    dm = rig.session.request(msg("DIRTY_QUERY", volume=rig.vid))
    assert dm.type == "DIRTY_MAP", dm
    ext = [tuple(e) for e in dm.extents]
    assert ext == sorted(ext) and all(n > 0 for _, n in ext), "[SY-7]"
    assert covers(ext, off, 8192), f"un-ACKed write at {off} missing from {ext} [RP-8, SY-8]"


@clause("SY-14")
def test_synced_clears_only_after_the_reply(rig, s):
    """A write dropped after the READ_REPLY was enqueued is not healed by its SYNCED."""
    rig.need_writes()
    rig.hub.heal = False        # nothing may clear the marks but the agent's own rules
    off = 20 * 65536
    s.ack_policy = "hold"
    rig.write_seen(off, b"\x01" * 4096)
    rig.reconnect()
    sess = rig.session
    sess.ack_policy = "hold"
    read = sess.request(msg("READ", volume=rig.vid, offset=off, length=65536))
    assert read.type == "READ_REPLY"
    rig.write_seen(off, b"\x02" * 4096)               # after the reply; never ACKed
    sess.conn.send(msg("SYNCED", request_id=read.request_id, volume=rig.vid, offset=off,
                       length=65536))
    rig.reconnect()
    dm = rig.session.request(msg("DIRTY_QUERY", volume=rig.vid))
    assert covers([tuple(e) for e in dm.extents], off, 4096), \
        "a SYNCED for an older reply cleared a newer un-ACKed write [SY-14]"


@clause("SY-15", "RP-8")
def test_marked_before_the_guest_write_completes(rig, s):
    """Kill -9 the agent right after a guest write returns; the region must be dirty."""
    if not hasattr(rig.agent, "stop_agent"):
        pytest.skip("the suite can restart only the reference agent")
    rig.need_writes()
    rig.hub.heal = False        # nothing may clear the marks but the agent's own rules
    s.ack_policy = "hold"
    off = 30 * 65536
    rig.agent.guest_write(off, b"\x77" * 65536)       # completes before the hub ACKs (async)
    rig.agent.stop_agent()
    rig.agent.start(rig.hub.address)
    rig.connect()
    assert rig.attach.state != cf_codec.ENUMS["state"]["CLEAN"], "[SY-15]"
    if rig.attach.state == cf_codec.ENUMS["state"]["DIRTY"]:
        dm = rig.session.request(msg("DIRTY_QUERY", volume=rig.vid))
        assert covers([tuple(e) for e in dm.extents], off, 65536), "[SY-15]"


@clause("RP-1")
def test_writes_sent_in_completion_order(rig, s):
    rig.need_writes()
    seen = [rig.write_seen(40 * 65536 + i * 4096, bytes([i + 1]) * 4096) for i in range(8)]
    offs = [f.offset for f in seen]
    assert offs == sorted(offs) and len(set(id(f) for f in seen)) == 8


def start_guest_writer(rig, base: int, span: int, seed: int, align: int):
    """40 random 4 KiB guest writes into [base, base + span) on a thread;
    returns (thread, event set when done, list of the errors raised)."""
    stop, errors = threading.Event(), []

    def writer():
        rng = random.Random(seed)
        try:
            for _ in range(40):
                off = base + rng.randrange(0, span - 4096, align)
                rig.agent.guest_write(off, bytes([rng.randrange(1, 256)]) * 4096)
        except Exception as err:  # noqa: BLE001 - reported by the caller
            errors.append(err)
        finally:
            stop.set()

    t = threading.Thread(target=writer, name="cf-guest-writer")
    t.start()
    return t, stop, errors


def assert_stream_ends_in_disk(rig, writer, errors, received, start: int, initial,
                               base: int, why: str) -> None:
    """Once the guest writer is done: ``initial`` (the region at ``base`` before
    frame ``start``) with the frames received since applied in stream order, as
    a hub must, equals the disk.  Polled: the last WRITEs may still be on their
    way, while stale data never heals."""
    writer.join(60)
    assert not errors, errors
    disk = rig.agent.guest_read(base, len(initial))

    def model() -> bytes:
        image = bytearray(initial)
        apply_stream(list(received)[start:], rig.vid, image, base)
        return bytes(image)

    deadline = time.monotonic() + T
    while model() != disk and time.monotonic() < deadline:
        time.sleep(0.05)
    assert model() == disk, why


def apply_stream(frames, vid: int, image: bytearray, base: int) -> None:
    """Apply WRITE / ZERO / READ_REPLY / zero extents of EXTENTS to ``image``
    (which holds [base, base + len(image))) in stream order, as a hub does."""
    end = base + len(image)

    def put(offset, length, data=None):
        lo, hi = max(offset, base), min(offset + length, end)
        if lo < hi:
            image[lo - base:hi - base] = bytes(hi - lo) if data is None else \
                data[lo - offset:hi - offset]

    for f in frames:
        if not isinstance(f, Msg) or f.volume != vid:
            continue
        if f.type in ("WRITE", "READ_REPLY") and not f.flags & FLAG_ZERO:
            put(f.offset, f.length, bytes(f.data))
        elif f.type in ("ZERO", "READ_REPLY"):
            put(f.offset, f.length)
        elif f.type == "EXTENTS":
            pos = f.offset
            for n, flags in f.extents:
                if flags & cf_codec.EXTENT_ZERO:
                    put(pos, n)
                pos += n


@clause("SY-2", "RP-1")
def test_stale_read_rule(rig, s):
    """Writes race with the hub's READs of the same region; applying the stream in
    order (as a hub must) has to end in the disk's content [SY-2]."""
    rig.need_writes()
    base, span = 48 * 65536, 4 * 65536
    replica = bytearray(s.request(msg("READ", volume=rig.vid, offset=base, length=span)).data
                        or bytes(span))
    start = len(s.received)
    t, stop, errors = start_guest_writer(rig, base, span, seed=5, align=512)
    reads = 0
    while not stop.is_set() and reads < 200:
        s.request(msg("READ", volume=rig.vid, offset=base, length=span))
        reads += 1
    assert_stream_ends_in_disk(
        rig, t, errors, s.received, start, replica, base,
        f"a READ_REPLY carried data older than a WRITE sent before it ({reads} READs) [SY-2]")


EXTENTS = cf_codec.FEATURES["EXTENTS"]


@pytest.fixture
def ext(rig, s):
    """A connection granted EXTENTS (skips for an agent that does not offer it);
    the next test gets a connection without it again."""
    if not s.hello.features & EXTENTS:
        pytest.skip("the agent does not offer feature EXTENTS")
    session = rig.reconnect(features=EXTENTS)
    try:
        yield session
    finally:
        rig.reconnect()


@clause("SY-5", "SY-17", "SY-18")
def test_extents_answers(rig, ext):
    rig.need_writes()
    base = 56 * 65536               # after the other tests' regions, before the last 64 KiB
    data = os.urandom(2 * 4096)
    rig.write_seen(base + 65536, data)
    length = 2 * 65536
    r = ext.request(msg("EXTENT_QUERY", volume=rig.vid, offset=base, length=length))
    assert (r.type, r.volume, r.offset, r.length) == ("EXTENTS", rig.vid, base, length), \
        f"echo [SY-5]: {r}"
    assert r.extents and all(n >= 1 and not fl & ~cf_codec.EXTENT_ZERO for n, fl in r.extents) \
        and sum(n for n, _ in r.extents) <= length, f"extents {r.extents} [SY-17]"
    disk = rig.agent.guest_read(base, length)
    pos = 0
    for n, flags in r.extents:
        if flags & cf_codec.EXTENT_ZERO:
            assert not any(disk[pos:pos + n]), \
                f"EXTENT_ZERO on [{base + pos}, +{n}) which holds data [SY-18]"
        pos += n
    rig.alive()


@clause("SY-16", "RP-1")
def test_stale_extents_rule(rig, ext):
    """Guest writes land in zero regions while the hub asks EXTENT_QUERY about
    them; applying the stream in order (zero extents as ZERO) must end in the
    disk's content [SY-16]."""
    rig.need_writes()
    base, span = 60 * 65536, 3 * 65536
    first = ext.request(msg("READ", volume=rig.vid, offset=base, length=span))
    image = bytearray(bytes(first.data) if not first.flags & FLAG_ZERO else bytes(span))
    start = len(ext.received)
    t, stop, errors = start_guest_writer(rig, base, span, seed=9, align=4096)
    queries = 0
    while not stop.is_set() and queries < 300:
        r = ext.request(msg("EXTENT_QUERY", volume=rig.vid, offset=base, length=span))
        assert r.type == "EXTENTS", r
        queries += 1
    assert_stream_ends_in_disk(
        rig, t, errors, ext.received, start, image, base,
        f"a zero extent hid a write sent before its EXTENTS ({queries} queries) [SY-16]")


@clause("LV-3", "RP-8")
def test_agent_reconnects_after_goodbye(rig, s):
    s.conn.send(msg("GOODBYE", reason="hub going away"))
    wait_until(lambda: s.closed.is_set(), T, "the agent to close after GOODBYE")
    rig.connect()
    rig.alive()


# ---------------------------------------------------------------------------
# Malformed frames sent to the agent


def _vectors():
    out = []
    for path in sorted(VECTORS.glob("malformed*.json")):
        for v in json.loads(path.read_text())["vectors"]:
            raw = bytes.fromhex(v["hex"])
            if v["action"] == "close" and v["phase"] != "handshake":
                continue    # the agent's handshake phase is tested with the hub's frames
            ftype = cf_codec.TYPE_NAMES.get(raw[5])
            if ftype in NEVER_ANSWERED:
                marks = [clause("ER-3")]
            elif v["phase"] == "handshake":
                marks = [clause("ER-5", "HS-13")]
            else:
                marks = [clause(*cf_codec.vector_clauses(v), "ER-6")]
            out.append(pytest.param(v, id=f"{path.stem}:{v['name']}", marks=marks))
    return out


@pytest.mark.parametrize("vector", _vectors())
def test_malformed_frame_to_agent(rig, s, vector):
    """The agent answers ERROR(code) with the frame's request id and goes on;
    ERROR/ACK/PONG/SYNCED/GOODBYE are never answered [ER-3].  A type the agent
    never takes after AUTH_OK (an agent-to-hub or handshake type, one of a
    feature not granted) is UNSUPPORTED whatever else is wrong in it: the
    check order puts direction and phase right after the type [ER-5, VN-6]."""
    raw = bytes.fromhex(vector["hex"])
    action, code = cf_codec.established_outcome(vector, "A", s.features)
    start = len(s.received)
    s.conn.send_raw(raw)
    rig.alive()
    got = [f for f in s.received[start:] if isinstance(f, Msg) and f.type == "ERROR"]
    if action == "drop":
        assert got == [], f"{vector['name']} answered with ERROR [ER-3]"
        return
    assert len(got) == 1, got
    assert error_of(got[0]) == code, got[0]
    assert got[0].request_id == int.from_bytes(raw[8:16], "big"), "the frame's id [ER-2]"
