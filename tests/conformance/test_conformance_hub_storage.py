"""Hub conformance: unfinished syncs, checkpoint names, one attachment per volume,
and a hub whose storage fails.

SY-21 and CP-3 are judged on the hub under test.  RP-10 and RP-11 need the
hub's own disk to fill up, which only a hub this suite starts can be made
to do: they run against the reference hub with its data directory on a
small tmpfs, and are skipped for an external hub (``--hub``) or where a
tmpfs cannot be mounted.
"""

from __future__ import annotations

import os
import time

import pytest

from cf_codec import msg
from cf_peers import Closed, MemVolume, SpecAgent
from cf_targets import RefHub
from smallfs import MiB, ballast, tmpfs
from test_conformance_hub import (CHUNK, PLAN, SIZE, T, clause, connect, describe, error_of,
                                  full_sync, replica_diff, vname, wait_recoverable)

pytestmark = pytest.mark.hub


class SyncAgent(SpecAgent):
    """Answers DIRTY_QUERY with ``dirty``; with ``refuse`` set, answers every
    request of that type (READ, DIRTY_QUERY or CHECKSUM_QUERY) with ERROR."""

    refuse: str | None = None
    dirty: list = []

    def _refused(self, m) -> bool:
        if m.type != self.refuse:
            return False
        self.conn.send(msg("ERROR", request_id=m.request_id, code=9,
                           failed_type=FAILED_TYPE[m.type], message="refused by the test"))
        return True

    def on_READ(self, m) -> None:
        if not self._refused(m):
            super().on_READ(m)

    def on_CHECKSUM_QUERY(self, m) -> None:
        if not self._refused(m):
            super().on_CHECKSUM_QUERY(m)

    def on_DIRTY_QUERY(self, m) -> None:
        if not self._refused(m):
            self.conn.send(msg("DIRTY_MAP", request_id=m.request_id, volume=m.volume,
                               extents=list(self.dirty)))


FAILED_TYPE = {"READ": 0x30, "DIRTY_QUERY": 0x32, "CHECKSUM_QUERY": 0x34}


def sync_agent(hub, codec, refuse=None, dirty=()) -> SyncAgent:
    a = SyncAgent(hub.address, hub.agent_id, hub.secret, codec)
    a.refuse, a.dirty = refuse, list(dirty)
    return a


#: PROTOCOL.md "Feature bits" and GoodbyeCode ([LV-5]).
GOODBYE_CODE, STORAGE_RECOVERED = 1 << 2, 3


@clause("SY-21", "SY-1", "RC-1", "SY-9")
@pytest.mark.parametrize("plan,refused", [("FULL", "READ"), ("DIRTY", "DIRTY_QUERY"),
                                          ("DIRTY", "READ"), ("VERIFY", "CHECKSUM_QUERY"),
                                          ("VERIFY", "READ")])
def test_a_sync_answered_with_error_is_redone_in_full(hub, codec, plan, refused):
    """The agent answers one of the plan's requests with ERROR, then writes and
    reports an unsent region: the volume is not consistent and no point of it
    is offered until a later ATTACH redoes the whole plan, which converges to
    the agent's disk byte for byte."""
    vol = MemVolume(vname("sy21"), SIZE, CHUNK, data=os.urandom(SIZE))
    state = {"FULL": "CLEAN", "DIRTY": "DIRTY", "VERIFY": "UNKNOWN"}[plan]
    if plan != "FULL":
        a = connect(hub, codec)
        try:
            full_sync(a, vol)
            wait_recoverable(a, vol)
        finally:
            a.close()
        vol.buf[0:CHUNK] = os.urandom(CHUNK)      # written while disconnected: marked
    a = sync_agent(hub, codec, refused, [(0, CHUNK)])
    try:
        att = a.attach(vol, state)
        assert att.type == "ATTACHED" and att.plan == PLAN[plan], describe(att)
        a.wait_for(lambda f: getattr(f, "type", "") == refused, T, f"the plan's {refused}")
        assert a.request(msg("WRITE", volume=vol.volume_id, offset=4 * CHUNK,
                             data=b"\x21" * 4096)).type == "ACK"
        vol.buf[4 * CHUNK:4 * CHUNK + 4096] = b"\x21" * 4096
        vol.buf[2 * CHUNK:3 * CHUNK] = os.urandom(CHUNK)
        seen = len(a.frames(refused))
        a.send(msg("DIRTY_MAP", volume=vol.volume_id, extents=[(2 * CHUNK, CHUNK)]))
        # Whatever the hub does with the report (READ it, or redo the whole plan),
        # the sync it owes is not done: no point of now is offered.
        a.wait_for(lambda f: len(a.frames(refused)) > seen or any(
            s.offset <= 2 * CHUNK < s.offset + s.length for s in a.frames("SYNCED")),
            T, "the hub to act on the unsolicited DIRTY_MAP")
        # The hub records a sync's end a little after its last SYNCED: ask for
        # a while, so that a hub that wrongly ends the resync is caught.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            m = a.request(msg("RECOVER_OPEN", mode="TEST", name=vol.name, point="latest"))
            assert error_of(m) == "INCONSISTENT", \
                f"latest offered although the {plan} sync the agent refused never finished " \
                "[SY-21]"
    finally:
        a.close()
    good = sync_agent(hub, codec, None, [(0, CHUNK), (2 * CHUNK, CHUNK)])
    try:
        att = good.attach(vol, "DIRTY")
        assert att.type == "ATTACHED" and att.plan >= PLAN[plan], \
            f"the unfinished {plan} sync is redone at least as strong [SY-1]: {describe(att)}"
        wait_recoverable(good, vol)
    finally:
        good.close()
    assert replica_diff(hub, codec, vol) == [], "the redone sync left differences"


@clause("CP-3")
def test_a_checkpoint_name_names_one_point(hub, codec):
    vol = MemVolume(vname("cp3"), SIZE, CHUNK)
    a = connect(hub, codec)
    try:
        full_sync(a, vol)
        name = vname("twice")
        assert a.request(msg("CHECKPOINT", name=name)).type == "ACK"
        assert error_of(a.request(msg("CHECKPOINT", name=name))) == "INVALID", "[CP-3]"
    finally:
        a.close()


@clause("VO-7", "VO-6")
def test_a_volume_is_attached_on_one_connection_at_a_time(hub, codec):
    vol = MemVolume(vname("vo7"), SIZE, CHUNK, data=os.urandom(SIZE))
    first = connect(hub, codec)
    second = None
    try:
        full_sync(first, vol)
        second = connect(hub, codec)
        att = second.attach(vol, "CLEAN")
        assert att.type == "ATTACHED", describe(att)
        assert att.plan >= 2, f"taken from a live connection: plan {att.plan}, not VERIFY [VO-7]"
        try:
            m = first.request(msg("WRITE", volume=vol.volume_id, offset=0, data=b"\x07" * 4096))
        except Closed:   # the hub MAY close the old connection
            return
        assert error_of(m) == "NO_SUCH_VOLUME", "the old attachment still takes writes [VO-7]"
    finally:
        first.close()
        if second is not None:
            second.close()


# -- the hub's own disk fills up (reference hub only) -------------------------------


@pytest.fixture
def full_disk_hub(setup):
    if not setup.ref_hub:
        pytest.skip("RP-10/RP-11 fill the hub's own disk: reference hub only")
    target = RefHub()
    try:
        with tmpfs(target.dir / "data", 40 * MiB) as data:
            try:
                yield target.start(), data
            finally:
                target._kill()   # before the unmount
    finally:
        target.stop()


@clause("RP-10", "RP-11", "RP-5", "RP-3", "LV-5")
def test_a_hole_in_the_stream_is_never_followed_by_an_ack(full_disk_hub, codec):
    hub, data = full_disk_hub
    vol = MemVolume(vname("rp10"), 4 * MiB, CHUNK, data=os.urandom(4 * MiB))
    a = connect(hub, codec, features=GOODBYE_CODE)
    try:
        full_sync(a, vol)
        space = ballast(data, 6 * MiB)
        answers = []
        for i in range(64):
            off = (i % 32) * 2 * CHUNK
            answers.append(a.request(msg("WRITE", volume=vol.volume_id, offset=off,
                                         data=os.urandom(2 * CHUNK))))
            if sum(m.type == "ERROR" for m in answers) >= 3:
                break
        kinds = [m.type for m in answers]
        assert "ERROR" in kinds, f"the hub never refused a write on a full disk: {kinds}"
        first = kinds.index("ERROR")
        assert all(k == "ERROR" for k in kinds[first:]), \
            f"a write after a refused one was ACKed [RP-10]: {kinds}"
        assert {error_of(m) for m in answers[first:]} == {"IO_ERROR"}
        assert error_of(a.request(msg("CHECKPOINT", name=vname("hole")))) == "IO_ERROR", \
            "a checkpoint after a hole [RP-10]"
        assert a.request(msg("FLUSH")).type == "ACK", "FLUSH covers what was not refused [RP-3]"
        assert a.request(msg("PING", sent_ns=7)).type == "PONG"

        os.unlink(space)
        bye = a.wait_for(lambda f: getattr(f, "type", "") == "GOODBYE", T,
                         "GOODBYE once the hub's storage recovered [RP-11]")
        assert bye.reason
        if a.handshake["reply"].features & GOODBYE_CODE:
            assert bye.code == STORAGE_RECOVERED, f"{bye}: code STORAGE_RECOVERED [LV-5]"
    finally:
        a.close()
    a = connect(hub, codec)
    try:
        att = a.attach(vol, "DIRTY")
        assert att.type == "ATTACHED" and att.plan in (1, 2, 3), \
            f"the ATTACH after the hole must resync the marked regions [RP-11]: {describe(att)}"
    finally:
        a.close()
