"""Agent direction, fail-back (PROTOCOL.md "Fail-back"): the suite plays a hub
that grants FAILBACK and attaches the volume DEMOTED, and judges the agent's
answers to FAILBACK_BEGIN, PUT and FAILBACK_END.

A fail-back needs the agent's storage in a given state -- the VM's writable
export present or removed, the agent started with or without its operator's
consent -- which the suite can arrange only for the reference agent
(repagent.py protect on qemu-storage-daemon, started here):

    QSD export exp0   writable, the VM's; removed for the fail-back proper
    QSD export src    read-only: the agent's --source, and how the suite reads
                      the disk (a read-only export cannot write the node)

An external agent (--agent-listen) and the fakes skip these tests with that
reason; the clause table shows them as skipped, not passed.
"""

from __future__ import annotations

import os
import shutil

import pytest

from cf_codec import CODE_NAMES, ENUMS, FLAG_ZERO, Msg, msg
from cf_peers import Closed, SpecHub, wait_until
from cf_targets import RefAgent, require_reference_agent

clause = pytest.mark.clause
T = 15.0
RECONNECT = 30.0
FAILBACK = 1 << 1           # PROTOCOL.md "Feature bits"
CHUNK = 65536


def error_of(m) -> str:
    assert isinstance(m, Msg) and m.type == "ERROR", f"expected ERROR, got {m}"
    return CODE_NAMES.get(int(m.code), str(m.code))


def covers(extents, offset, length) -> bool:
    pos = offset
    for o, n in sorted(tuple(e) for e in extents):
        if o <= pos < o + n:
            pos = o + n
    return pos >= offset + length


class FailbackRig:
    """One reference agent on its own QSD, and a SpecHub granting FAILBACK."""

    def __init__(self, codec):
        from qemu_harness import QSD
        self.agent = RefAgent()
        run = self.agent.dir
        self.agent.agent_qmp = run / "aqmp.sock"
        self.qsd = self.agent.qsd = QSD(run / "qsd", size=self.agent.size, extra_args=[
            "--chardev", f"socket,id=qmp1,path={self.agent.agent_qmp},server=on,wait=off",
            "--monitor", "chardev=qmp1",
            "--export", "type=nbd,id=src,node-name=disk0,name=src,writable=off"]).start()
        self.agent.source_uri = f"nbd+unix:///src?socket={self.qsd.export_path}"
        self.agent.nbd_uri = self.agent.source_uri          # guest_read
        self.hub = SpecHub(("127.0.0.1", 0), self.agent.agent_id, self.agent.secret, codec)
        self.hub.heal = False        # a DEMOTED volume is not synced; only the tests ask
        self.accept: bool | None = None
        self.session = None
        self.attach: Msg | None = None

    def run(self, accept: bool, plan: str = "DEMOTED"):
        """A fresh connection with the volume attached ``plan``; the agent
        (re)started when its --accept-failback must change."""
        if self.session is not None:
            self.session.drop()
        if accept != self.accept:
            self.agent.stop_agent()
            self.agent.extra_args = ["--accept-failback"] if accept else []
            self.agent.start(self.hub.address)
            self.accept = accept
        self.hub.plan = plan
        self.session = self.hub.session(timeout=RECONNECT, features=FAILBACK)
        self.attach = self.session.wait_for(
            lambda f: isinstance(f, Msg) and f.type == "ATTACH", T, "ATTACH")
        return self.session

    def crash_restart(self):
        """kill -9 the agent and start it again with the same options."""
        self.agent.stop_agent()
        self.session.drop()
        self.agent.start(self.hub.address)
        self.session = self.hub.session(timeout=RECONNECT, features=FAILBACK)
        self.attach = self.session.wait_for(
            lambda f: isinstance(f, Msg) and f.type == "ATTACH", T, "ATTACH")

    @property
    def vid(self) -> int:
        return self.session.volume_id(self.attach.name)

    def ask(self, m: Msg, timeout: float = T) -> Msg:
        """Send ``m``; its ACK or ERROR (the agent answers these three with either)."""
        s = self.session
        m.request_id = s.new_req()
        s.conn.send(m)
        return s.wait_for(lambda f: isinstance(f, Msg) and f.request_id == m.request_id
                          and f.type in ("ACK", "ERROR"), timeout, f"answer to {m.type}")

    def dirty(self) -> list:
        dm = self.session.request(msg("DIRTY_QUERY", volume=self.vid))
        assert dm.type == "DIRTY_MAP", dm
        return [tuple(e) for e in dm.extents]

    # -- the agent's storage, as its operator would change it ------------------

    def exports(self) -> dict[str, str]:
        return {e["id"]: e["node-name"] for e in self.qsd.qmp("query-block-exports")}

    def vm_export(self, present: bool) -> None:
        """The VM's writable export: on the node the read-only one is on (the
        mirror's filter while the mirror runs), or removed."""
        have = "exp0" in self.exports()
        if present and not have:
            self.qsd.qmp("block-export-add", type="nbd", id="exp0", name="exp0", writable=True,
                         **{"node-name": self.exports()["src"]})
        elif not present and have:
            self.qsd.qmp("block-export-del", id="exp0")
            wait_until(lambda: "exp0" not in self.exports(), T, "exp0 removed")

    def guest_write(self, offset: int, data: bytes) -> None:
        import nbd
        with nbd.NBDClient(str(self.qsd.export_path), "exp0") as c:
            c.write(offset, data)

    def close(self) -> None:
        if self.session is not None:
            self.session.drop()
        self.hub.close()
        self.qsd.kill()          # first: a QSD quitting with its mirror target gone waits
        self.agent.stop()
        shutil.rmtree(self.agent.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def fb(setup, codec):
    require_reference_agent(setup, "fail-back tests arrange the agent's QSD and options")
    rig = FailbackRig(codec)
    try:
        yield rig
    finally:
        rig.close()


def begin(fb: FailbackRig) -> Msg:
    return fb.ask(msg("FAILBACK_BEGIN", volume=fb.vid))


def end(fb: FailbackRig, outcome: str) -> Msg:
    return fb.ask(msg("FAILBACK_END", volume=fb.vid, outcome=outcome))


def put(fb: FailbackRig, offset: int, data: bytes) -> Msg:
    return fb.ask(msg("PUT", volume=fb.vid, offset=offset, data=data))


# Module order matters: the agent is restarted only when its consent changes.


@clause("FB-3")
def test_begin_without_the_operators_consent_is_not_allowed(fb):
    fb.run(accept=False)
    fb.vm_export(present=False)          # only the consent is missing
    assert error_of(begin(fb)) == "NOT_ALLOWED", "[FB-3]"
    assert error_of(put(fb, 0, b"x" * 4096)) == "BAD_PHASE", "no PUT after a refusal [FB-5]"
    assert fb.agent.guest_read(0, 4096) == bytes(4096)


@clause("FB-5")
def test_failback_frames_out_of_phase_are_bad_phase(fb):
    fb.run(accept=True, plan="NONE")
    fb.vm_export(present=False)
    assert error_of(begin(fb)) == "BAD_PHASE", "BEGIN on a volume not attached DEMOTED [FB-5]"
    fb.run(accept=True)
    assert error_of(put(fb, CHUNK, b"y" * 4096)) == "BAD_PHASE", "PUT before BEGIN [FB-5]"
    assert error_of(end(fb, "DONE")) == "BAD_PHASE", "END before BEGIN [FB-5]"
    assert error_of(end(fb, "ABORT")) == "BAD_PHASE"
    assert fb.agent.guest_read(CHUNK, 4096) == bytes(4096), "a refused PUT writes nothing"


@clause("FB-4")
def test_begin_with_another_writer_is_busy(fb):
    fb.run(accept=True)
    fb.vm_export(present=True)
    assert error_of(begin(fb)) == "BUSY", "the VM's writable export still exists [FB-4]"
    assert error_of(put(fb, 0, b"z" * 512)) == "BAD_PHASE", "BUSY is no BEGIN [FB-4, FB-5]"
    fb.vm_export(present=False)
    assert begin(fb).type == "ACK", "nothing else writes the node now"
    assert end(fb, "ABORT").type == "ACK"


@clause("FB-6")
def test_put_is_marked_first_and_acked_once_written(fb):
    fb.run(accept=True)
    fb.vm_export(present=False)
    assert begin(fb).type == "ACK"
    data = os.urandom(3 * CHUNK + 4096)
    assert put(fb, 8 * CHUNK, data).type == "ACK"
    zero = fb.ask(msg("PUT", volume=fb.vid, offset=8 * CHUNK, length=4096, flags=FLAG_ZERO,
                      data=b""))
    assert zero.type == "ACK"
    assert fb.agent.guest_read(8 * CHUNK, len(data)) == bytes(4096) + data[4096:], \
        "a PUT is ACKed only once written [FB-6]"
    # Cut the connection mid fail-back: the PUT regions are still marked dirty.
    fb.run(accept=True)
    assert fb.attach.state != ENUMS["state"]["CLEAN"], "[FB-6]"
    assert covers(fb.dirty(), 8 * CHUNK, len(data)), "PUT regions marked [FB-6]"
    # And in its persistent state: kill -9 right after a PUT's ACK.
    assert begin(fb).type == "ACK"
    assert put(fb, 20 * CHUNK, b"\x42" * 4096).type == "ACK"
    fb.crash_restart()
    assert fb.attach.state != ENUMS["state"]["CLEAN"], "marks survive a crash [FB-6]"
    if fb.attach.state == ENUMS["state"]["DIRTY"]:
        assert covers(fb.dirty(), 20 * CHUNK, 4096), "[FB-6]"


@clause("FB-11")
def test_abort_keeps_the_marks_and_the_demotion(fb):
    fb.run(accept=True)
    fb.vm_export(present=False)
    assert begin(fb).type == "ACK"
    assert put(fb, 30 * CHUNK, b"\x33" * 8192).type == "ACK"
    assert end(fb, "ABORT").type == "ACK"
    assert covers(fb.dirty(), 30 * CHUNK, 8192), "ABORT keeps the PUT regions marked [FB-11]"
    assert error_of(put(fb, 30 * CHUNK, b"\x34" * 512)) == "BAD_PHASE", "[FB-11, FB-5]"
    fb.vm_export(present=True)           # the VM runs again: still demoted, nothing sent
    start = len(fb.session.frames("WRITE")) + len(fb.session.frames("ZERO"))
    fb.guest_write(40 * CHUNK, b"\x44" * 4096)
    wait_until(lambda: covers(fb.dirty(), 40 * CHUNK, 4096), T, "the write marked")
    assert len(fb.session.frames("WRITE")) + len(fb.session.frames("ZERO")) == start, \
        "a demoted volume's writes are not sent [FB-11]"


@clause("FB-7")
def test_done_clears_the_marks_and_writes_stream_after_the_ack(fb):
    fb.run(accept=True)
    fb.vm_export(present=False)
    assert fb.dirty(), "earlier tests left marks"
    assert begin(fb).type == "ACK"
    data = os.urandom(CHUNK)
    assert put(fb, 50 * CHUNK, data).type == "ACK"
    done = end(fb, "DONE")
    assert done.type == "ACK", done
    assert fb.agent.guest_read(50 * CHUNK, CHUNK) == data, "durable before the ACK [FB-7]"
    assert fb.dirty() == [], "DONE clears the volume's marks [FB-7]"
    fb.vm_export(present=True)
    fb.guest_write(52 * CHUNK, b"\x55" * 4096)
    s = fb.session
    w = s.wait_for(lambda f: isinstance(f, Msg) and f.type == "WRITE"
                   and f.offset == 52 * CHUNK, T, "the WRITE after DONE")
    assert bytes(w.data) == b"\x55" * 4096
    with s.cond:
        assert s.received.index(w) > s.received.index(done), \
            "writes stream from the ACK on [FB-7]"
    try:
        pong = s.request(msg("PING", sent_ns=5))
    except Closed:
        pytest.fail("the agent closed the connection after DONE")
    assert pong.type == "PONG"
