"""Hub direction: the rules an independent implementation found unstated.

Each test judges one clause that PROTOCOL.md added so that a reader of the
specification alone knows what the hub does (docs/CONFORMANCE.md, "Changes
since v1"): request ids [RP-12], messages of a feature not granted [VN-6],
answers to nothing outstanding [ER-7], a second ATTACH on one connection
[VO-9], the bounds of FLAG_ZERO frames [FR-18], the one grammar of a
point's time stamp [RC-8] and the check order's precedence of [ER-3].
"""

from __future__ import annotations

import time

import pytest

from cf_codec import FEATURES, FLAG_ZERO, Msg, msg
from cf_peers import MemVolume
from test_conformance_hub import (CHUNK, CRAFT, SIZE, T, clause, connect, describe, error_of,
                                  full_sync, known_volume, replica_diff, vname,
                                  wait_recoverable)

pytestmark = pytest.mark.hub


def answers(a, req: int, after: int) -> list:
    """The frames answering ``req`` received since index ``after``."""
    with a.cond:
        return [f for f in a.received[after:] if isinstance(f, Msg) and f.request_id == req
                and f.type in a.ANSWERS]


def settled(a) -> None:
    """Every frame sent before this call has been read by the hub: a PING
    behind them is answered (the hub reads one frame at a time, in order)."""
    assert a.request(msg("PING", sent_ns=1)).type == "PONG"


@clause("RP-12", "ER-1")
def test_a_request_with_request_id_zero_closes_and_is_not_applied(hub, codec):
    vol = known_volume(hub, codec, "rid0")
    a = connect(hub, codec)
    try:
        assert a.attach(vol).type == "ATTACHED"
        a.conn.send_raw(CRAFT.encode(msg("WRITE", request_id=0, volume=vol.volume_id,
                                         offset=0, data=b"\x5a" * 4096)))
        a.closed.wait(T)
        assert a.closed.is_set(), "a request with request_id 0 ends the connection [RP-12]"
        errors = a.frames("ERROR")
        assert [error_of(e) for e in errors] == ["PROTOCOL"], [describe(e) for e in errors]
        assert not a.frames("ACK"), "nothing of it is acknowledged"
    finally:
        a.close()
    assert replica_diff(hub, codec, vol) == [], "the WRITE with request_id 0 was applied"


@clause("VN-6", "VN-5")
def test_extents_on_a_connection_without_the_feature_is_unsupported(hub, codec):
    a = connect(hub, codec)          # offers no feature
    try:
        assert not a.handshake["reply"].features & FEATURES["EXTENTS"]
        req = 4242
        a.send(msg("EXTENTS", request_id=req, volume=1, offset=0, length=4096,
                   extents=[(4096, 1)]))
        err = a.wait_answer(req)
        assert error_of(err) == "UNSUPPORTED", describe(err)
        assert int(err.failed_type) == 0x38
    finally:
        a.close()


@clause("ER-7", "SY-17")
@pytest.mark.parametrize("kind", ["READ_REPLY", "READ_REPLY_ZERO", "DIRTY_MAP", "CHECKSUMS",
                                  "EXTENTS"])
def test_an_answer_to_nothing_outstanding_is_invalid_and_not_applied(hub, codec, kind):
    """Answers the hub never asked for: ERROR(INVALID), and the replica is
    untouched (an unasked READ_REPLY applied would overwrite newer data)."""
    vol = known_volume(hub, codec, "unasked")
    a = connect(hub, codec, features=FEATURES["EXTENTS"])
    try:
        assert a.attach(vol).type == "ATTACHED"
        settled(a)
        req, vid = 777_000, vol.volume_id
        frames = {
            "READ_REPLY": msg("READ_REPLY", request_id=req, volume=vid, offset=0,
                              data=b"\x77" * 4096),
            "READ_REPLY_ZERO": msg("READ_REPLY", request_id=req, volume=vid, offset=0,
                                   length=CHUNK, flags=FLAG_ZERO),
            "DIRTY_MAP": msg("DIRTY_MAP", request_id=req, volume=vid, extents=[(0, CHUNK)]),
            "CHECKSUMS": msg("CHECKSUMS", request_id=req, volume=vid, offset=0, length=CHUNK,
                             chunk_size=CHUNK, algorithm="SHA256", digests=[bytes(32)]),
            "EXTENTS": msg("EXTENTS", request_id=req, volume=vid, offset=0, length=CHUNK,
                           extents=[(CHUNK, 1)]),
        }
        before = len(a.received)
        a.send(frames[kind])
        settled(a)
        errors = [f for f in answers(a, req, before) if f.type == "ERROR"]
        assert [error_of(e) for e in errors] == ["INVALID"], [describe(e) for e in errors]
    finally:
        a.close()
    assert replica_diff(hub, codec, vol) == [], f"an unasked {kind} was applied [ER-7]"


@clause("VO-9", "VO-5")
def test_a_second_attach_on_the_same_connection_is_busy_and_the_first_goes_on(hub, codec):
    vol = MemVolume(vname("again"), SIZE, CHUNK)
    a = connect(hub, codec)
    try:
        first = full_sync(a, vol)
        again = a.attach(vol)
        assert error_of(again) == "BUSY", describe(again)
        assert a.request(msg("WRITE", volume=first.volume, offset=CHUNK,
                             data=b"\x61" * 4096)).type == "ACK", \
            "the first attachment's volume id stays valid [VO-9]"
        vol.buf[CHUNK:CHUNK + 4096] = b"\x61" * 4096
        assert len(a.frames("ATTACHED")) == 1
    finally:
        a.close()
    assert replica_diff(hub, codec, vol) == []


@clause("FR-18")
def test_flag_zero_frames_are_bounded_and_zero_is_not(hub, codec):
    """A 64 MiB ZERO is a valid write of a large volume; a FLAG_ZERO frame of
    MAX_DATA + 1 bytes is not (it stands for data, which MAX_DATA bounds)."""
    big = MemVolume(vname("bigzero"), 128 << 20, CHUNK)
    a = connect(hub, codec)
    try:
        full_sync(a, big, timeout=60)
        req = a.zero(big, 32 << 20, 64 << 20)
        assert a.wait_answer(req).type == "ACK", "ZERO is bounded by the volume's size only"
        too_long = (32 << 20) + 1
        err = a.request(msg("RWRITE", volume=1, offset=0, length=too_long, flags=FLAG_ZERO))
        assert error_of(err) == "INVALID", describe(err)
    finally:
        a.close()


@clause("RC-8", "RC-1")
@pytest.mark.parametrize("form", ["{d}T{t}+00:00", "{d} {t}Z", "{d}T{t}", "{d}t{t}z",
                                  "2026-02-30T00:00:00Z", "{d}T23:59:60Z"])
def test_a_point_time_in_another_grammar_is_a_bad_point(hub, codec, form):
    """Each form names (where it names a time at all) the same recoverable
    instant as the well-formed point the hub then opens, so only its grammar
    can make it BAD_POINT."""
    vol = MemVolume(vname("when"), SIZE, CHUNK)
    a = connect(hub, codec)
    try:
        full_sync(a, vol)
        wait_recoverable(a, vol)
        soon = time.gmtime(time.time() + 1)
        d, t = time.strftime("%Y-%m-%d", soon), time.strftime("%H:%M:%S", soon)
        point = form.format(d=d, t=t)
        err = a.request(msg("RECOVER_OPEN", mode="TEST", name=vol.name, point=point))
        assert error_of(err) == "BAD_POINT", f"{point}: {describe(err)}"
        ready = a.request(msg("RECOVER_OPEN", mode="TEST", name=vol.name,
                              point=f"{d}T{t}.5Z"))
        assert ready.type == "RECOVER_READY", f"{d}T{t}.5Z: {describe(ready)} [RC-8]"
        assert a.request(msg("RECOVER_CLOSE", volume=ready.volume)).type == "ACK"
    finally:
        a.close()


@clause("ER-3", "ER-5")
def test_a_wrong_direction_frame_of_a_never_answered_type_is_dropped(hub, codec):
    """SYNCED is the hub's to send; from the agent it is both in the wrong
    direction and of a type never answered: [ER-3] takes precedence."""
    a = connect(hub, codec)
    try:
        before = len(a.received)
        a.send(msg("SYNCED", request_id=99, volume=1, offset=0, length=4096))
        settled(a)
        assert not [f for f in a.received[before:] if isinstance(f, Msg) and f.type == "ERROR"]
    finally:
        a.close()


@clause("ER-5", "HS-13", "FR-7")
@pytest.mark.parametrize("type_name,request_id,code", [
    ("HELLO_REPLY", 5, "UNSUPPORTED"), ("HELLO_REPLY", 0, "UNSUPPORTED"),
    ("HELLO", 5, "BAD_PHASE"), ("HELLO", 0, "BAD_PHASE")])
def test_direction_and_phase_come_before_the_other_fields(hub, codec, type_name,
                                                          request_id, code):
    """A HELLO_REPLY from the agent is in the wrong direction whatever its
    request_id (which HELLO_REPLY does not use): the check order decides one
    code for it, not INVALID for one id and UNSUPPORTED for another."""
    fields = (dict(version=1, features=0, nonce=bytes(32), proof=bytes(32), hub_id="x")
              if type_name == "HELLO_REPLY" else
              dict(min_version=1, max_version=1, features=0, nonce=bytes(32), agent_id="x"))
    a = connect(hub, codec)
    try:
        before = len(a.received)
        a.conn.send_raw(CRAFT.encode(msg(type_name, request_id=request_id, **fields)))
        settled(a)
        errors = [f for f in a.received[before:] if isinstance(f, Msg) and f.type == "ERROR"]
        assert [error_of(e) for e in errors] == [code], [describe(e) for e in errors]
    finally:
        a.close()
