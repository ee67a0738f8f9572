"""Agent direction, a full send queue: the suite plays a hub that stops
reading, so that the agent must drop writes, and judges how it reports them.

Filling the queue needs the agent started with a small ``--max-queue`` and
its drops counted from its status, which the suite can arrange only for the
reference agent (repagent.py protect on qemu-storage-daemon, started here).
An external agent (--agent-listen) and the fakes skip these tests with that
reason; the clause table shows them as skipped, not passed.
"""

from __future__ import annotations

import struct
import time

import pytest

from cf_codec import Msg
from cf_peers import SpecHub, wait_until
from cf_targets import RefAgent, require_reference_agent

clause = pytest.mark.clause
T = 15.0
CHUNK = 65536
MAX_QUEUE = 1 << 20         # the agent's --max-queue: 16 writes of CHUNK
MAX_WRITES = 1024           # 64 MiB: more than loopback TCP buffers and the queue hold


class QueueRig:
    """One reference agent with a small send queue, and a SpecHub."""

    def __init__(self, codec):
        self.agent = RefAgent()
        self.agent.extra_args = ["--max-queue", str(MAX_QUEUE)]
        self.hub = SpecHub(("127.0.0.1", 0), self.agent.agent_id, self.agent.secret, codec)
        self.hub.plan = "NONE"        # no sync traffic: only the guest's writes
        self.agent.start(self.hub.address)
        self.session = self.hub.session(timeout=30.0)
        self.attach = self.session.wait_for(
            lambda f: isinstance(f, Msg) and f.type == "ATTACH", T, "ATTACH")
        wait_until(lambda: self.agent.status()["volumes"][0]["attached"], T,
                   "the volume attached")

    def dropped(self) -> int:
        return self.agent.status()["volumes"][0]["counters"].get("dropped_writes", 0)

    def close(self) -> None:
        self.session.drop()
        self.hub.close()
        if self.agent.qsd is not None:
            self.agent.qsd.kill()   # first: a QSD quitting with its mirror target gone waits
        self.agent.stop()


@pytest.fixture(scope="module")
def qr(setup, codec):
    require_reference_agent(setup, "filling the agent's send queue needs its --max-queue "
                                   "and its drop counter")
    rig = QueueRig(codec)
    try:
        yield rig
    finally:
        rig.close()


def index_of(frame: Msg) -> int:
    return struct.unpack_from("!Q", bytes(frame.data[:8]))[0]


@clause("SY-19")
def test_a_dropped_write_is_reported_ahead_of_every_later_frame(qr):
    import nbd
    s, size = qr.session, qr.attach.size
    slots = size // CHUNK
    qsd = qr.agent.qsd
    s.reading.clear()           # the hub stops reading: the socket, then the queue, fill up
    written = 0
    deadline = time.monotonic() + 60
    try:
        with nbd.NBDClient(str(qsd.export_path), qsd.export_name) as guest:
            def write() -> None:
                nonlocal written
                guest.write(written % slots * CHUNK,
                            struct.pack("!Q", written) + bytes(CHUNK - 8))
                written += 1
            while qr.dropped() < 3:   # a few drops while nothing drains
                assert written < MAX_WRITES and time.monotonic() < deadline, \
                    f"no write dropped after {written} writes of {CHUNK} bytes"
                for _ in range(16):
                    write()
            # Zeroes carry no data: queued even now, right behind the drops.
            zeroed = written % slots * CHUNK
            guest.write_zeroes(zeroed, CHUNK)
            s.reading.set()           # drains: the next writes are queued again
            wait_until(lambda: qr.agent.status()["volumes"][0]["queue_bytes"] < MAX_QUEUE // 2,
                       T, "the queue to drain")
            for _ in range(4):
                write()
    finally:
        s.reading.set()
    sent = lambda: {index_of(f) for f in s.frames("WRITE")}          # noqa: E731
    try:
        wait_until(lambda: {written - 4, written - 1} <= sent() or s.closed.is_set(), T,
                   "the writes after the drops")
    except TimeoutError as err:
        raise AssertionError(f"{err}; writes sent {len(sent())} of {written}; the agent's "
                             f"log ends:\n{qr.agent.tail()}") from None
    assert {written - 4, written - 1} <= sent(), \
        f"the agent closed the connection before the writes after the drops: {qr.agent.tail()}"
    first_dropped = min(set(range(written)) - sent())
    reports = [i for i, f in enumerate(s.received) if isinstance(f, Msg)
               and f.type == "DIRTY_MAP" and f.request_id == 0]
    assert reports, "the dropped writes are reported with an unsolicited DIRTY_MAP [SY-9]"
    wait_until(lambda: any(f.offset == zeroed for f in s.frames("ZERO")), T, "the ZERO")
    later = [i for i, f in enumerate(s.received) if isinstance(f, Msg) and (
             f.type == "WRITE" and index_of(f) > first_dropped or f.type == "ZERO")]
    assert later and reports[0] < later[0], \
        f"write #{first_dropped} was dropped, but a frame queued after it arrived before " \
        "the DIRTY_MAP reporting it [SY-19]"
    offset = first_dropped % slots * CHUNK
    first = s.received[reports[0]]
    assert any(o <= offset and offset + CHUNK <= o + n for o, n in first.extents), \
        f"the first DIRTY_MAP does not cover dropped write #{first_dropped} [SY-19]"
